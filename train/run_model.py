"""The model-dependent settings of ``headprobe run``, read from the model's config before any weights load.

Nothing in a run names a layer, a head count or a width of one model: the SAE's layer defaults to the model's
middle layer and its latents to ``--sae.expansion`` (8) x its input width (n_heads x d_head), extractions keep to
the model's positions, and the checks a model cannot have (causal-LM logits on an encoder, say) are listed with
the reason. :func:`resolve_run` fills the defaults and refuses settings the model cannot take, each in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from headprobe import InputError
from headprobe.extract.capabilities import Capabilities, config_capabilities
from headprobe.extract.hooks import ARCHITECTURES, FAMILIES, HeadLayout

@dataclass(frozen=True)
class RunModel:
    """What a run reads of its model: the heads' layout, its context in tokens (None: no limit known) and what it
    can give the checks."""

    name: str
    model_type: str
    layout: HeadLayout
    context: int | None
    capabilities: Capabilities


def run_model(config, tokenizer=None, name: str = "") -> RunModel:
    """The :class:`RunModel` of a transformers ``config`` (``name``: the model, for messages)."""
    from headprobe.extract.extractor import config_layout, context_limit

    model_type = getattr(config, "model_type", "")
    if model_type not in ARCHITECTURES:
        raise InputError(f"--model {name or model_type}: architecture {model_type!r} is not supported (supported "
                         f"families: {FAMILIES})")
    layout = config_layout(config)
    if layout is None:
        raise InputError(f"--model {name or model_type}: its config names no layer count, head count or width")
    return RunModel(name or model_type, model_type, layout, context_limit(config), config_capabilities(config, tokenizer))


def middle_layer(n_layers: int) -> int:
    return n_layers // 2


def resolve_sae(sae, model: RunModel):
    """``sae`` (an SAESettings) with the model's defaults filled in: the middle layer, expansion x the input width."""
    n_layers, width = model.layout.n_layers, model.layout.n_heads * model.layout.d_head
    layer = middle_layer(n_layers) if sae.layer is None else sae.layer
    if not 0 <= layer < n_layers:
        raise InputError(f"--sae.layer {layer}: {model.name} has layers 0..{n_layers - 1} (leave it out for the "
                         f"middle layer, {middle_layer(n_layers)})")
    d_sae = sae.expansion * width if sae.d_sae is None else sae.d_sae
    if d_sae < 1 or not 1 <= sae.k <= d_sae:
        raise InputError(f"--sae.d_sae {d_sae}, --sae.k {sae.k}: pass 1 <= k <= d_sae")
    return replace(sae, layer=layer, d_sae=d_sae)


def resolve_run(cfg, model: RunModel):
    """``cfg`` (a RunConfig) with every model-dependent default filled in and checked against ``model``."""
    return replace(cfg, sae=resolve_sae(cfg.sae, model))


def skipped_checks(cfg, model: RunModel) -> dict[str, str]:
    """The run's own checks (outside the attribution) that ``model`` cannot have, with the reason."""
    why = model.capabilities.missing(("causal_lm",))
    if why and cfg.sae.ce_tokens:
        return {"SAE CE loss recovered": f"{why}; the SAE is judged by FVE, MSE and sparsity on held-out tokens"}
    return {}
