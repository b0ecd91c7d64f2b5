"""What a model can give the checks, read from the model (or its config, before the weights load).

A step declares what it needs (names of :data:`NEEDS`); :func:`missing` says why a model cannot serve it, so that
the pipeline skips the step with that reason instead of crashing on a model that lacks, say, next-token logits.
"""
from __future__ import annotations

from dataclasses import dataclass

from headprobe.extract.hooks import ENCODERS

NEEDS = {
    "causal_lm": "next-token logits (a causal LM head)",
    "masked_lm": "a masked-LM head",
    "attentions": "attention weights",
    "chat_template": "a chat template",
}


@dataclass(frozen=True)
class Capabilities:
    """What a model has: ``causal_lm`` next-token logits, ``masked_lm`` a masked-LM head, ``attentions`` attention
    weights it can return, ``chat_template`` a tokenizer chat template."""

    model_type: str
    causal_lm: bool
    masked_lm: bool
    attentions: bool = True
    chat_template: bool = False

    def missing(self, needs: tuple[str, ...] | list[str]) -> str | None:
        """Why the model cannot serve a step that ``needs`` these (None: it can)."""
        lacking = [NEEDS[n] for n in needs if not getattr(self, n)]
        if not lacking:
            return None
        kind = "an encoder" if self.model_type in ENCODERS else "this model"
        return f"{self.model_type} is {kind} without {' or '.join(lacking)}"


def model_capabilities(model, tokenizer=None) -> Capabilities:
    """The capabilities of a loaded transformers model (``tokenizer``: for its chat template)."""
    model_type = model.config.model_type
    head = getattr(model, "get_output_embeddings", lambda: None)() is not None
    return Capabilities(model_type, head and model_type not in ENCODERS, head and model_type in ENCODERS,
                        chat_template=bool(getattr(tokenizer, "chat_template", None)))


def config_capabilities(config, tokenizer=None) -> Capabilities:
    """The capabilities the model of ``config`` will have once :func:`headprobe.extract.models.load_model` loads it
    (no weights read)."""
    from headprobe.extract.models import causal_class

    model_type = config.model_type
    causal = causal_class(config) and model_type not in ENCODERS
    return Capabilities(model_type, causal, False, chat_template=bool(getattr(tokenizer, "chat_template", None)))


def capabilities_of(loaded) -> Capabilities:
    """The capabilities of a LoadedModel."""
    return model_capabilities(loaded.model, loaded.tokenizer)
