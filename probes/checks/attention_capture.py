"""Reduce every head's attention pattern while the forward pass computes it, without keeping the (B, H, S, S)
matrices of all layers.

Eager attention returns ``(output, weights)`` from each layer's attention module (the parent of the output
projection of :mod:`headprobe.extract.hooks`), weights (B, H, Q, K) with one row per query head (grouped-query
models repeat the shared keys). A forward hook on each attention module hands those weights to a ``reduce``
function and keeps only what it returns; the training-free scores of :mod:`.retrieval` and :mod:`.negative` read
all heads of a batch this way in one forward pass, with no loop over heads. Memory: one layer's full pattern at a
time.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from headprobe import InputError
from headprobe.extract.hooks import out_projections, spec_for
from headprobe.probes.checks.head_scores import eager_attention

Reduce = Callable[[torch.Tensor], torch.Tensor]  # (B, H, Q, K) weights -> anything indexed by batch first


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every layer's attention module: the module holding the output projection (decoder families)."""
    spec = spec_for(model)
    parent = spec.out_proj.rsplit(".", 1)[0]
    blocks = model.base_model.get_submodule(spec.layers)
    return [block.get_submodule(parent) for block in blocks]


def require_causal_lm(model: nn.Module, what: str) -> None:
    """A one-line error unless ``model`` is a causal language model (the score needs its next-token output)."""
    if getattr(model, "get_output_embeddings", lambda: None)() is None or model.config.model_type in (
            "bert", "roberta", "xlm-roberta", "distilbert"):
        raise InputError(f"the {what} needs a causal language model with an LM head; "
                         f"{model.config.model_type} ({type(model).__name__}) is not one: pass a decoder model")


class AttentionCapture:
    """While active, ``calls[layer]`` collects ``reduce(weights)`` of every forward through that layer."""

    def __init__(self, model: nn.Module, reduce: Reduce):
        self.reduce = reduce
        self.calls: list[list[torch.Tensor]] = [[] for _ in out_projections(model)]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(attention_modules(model))]

    def _hook(self, layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None or weights.dim() != 4:
                raise RuntimeError(f"layer {layer}'s attention returned no weights: run it with eager attention")
            self.calls[layer].append(self.reduce(weights.detach()))
        return hook

    def stacked(self, call: int = -1) -> torch.Tensor:
        """One forward's reductions of every layer, stacked on dim 1: (B, L, ...)."""
        return torch.stack([c[call] for c in self.calls], dim=1)

    def clear(self) -> None:
        for c in self.calls:
            c.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def capture_attention(model: nn.Module, reduce: Reduce) -> Iterator[AttentionCapture]:
    """Eager attention and an :class:`AttentionCapture` for the duration of the block."""
    with eager_attention(model):
        capture = AttentionCapture(model, reduce)
        try:
            yield capture
        finally:
            capture.remove()


def right_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (B, S) ids padded on the right with ``pad``, and their (B, S) mask.
    Right padding leaves a causal model's real positions as they would be alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask
