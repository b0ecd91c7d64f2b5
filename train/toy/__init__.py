"""Toy models: small transformers trained from scratch on synthetic tasks whose mechanism is known
(``headprobe toy train``), saved as Hugging Face model folders every headprobe stage runs on.

    from headprobe.train.toy import train_task
    result = train_task("induction", "runs/toy-induction", logger="none")
    result.jobs   # {"previous_token": {"layer": 0, "head": 3, "score": 0.8, ...}, "induction": {...}}

Modules: ``tasks`` (training data), ``model`` (the LightningModule), ``data`` (the data module), ``record``
(curves and the phase-change plot), ``check`` (single-head ablations), ``fit`` (training and saving), ``cli``.
The names below load lazily, so that reading a record does not import Lightning. See docs/toy-models.md.
"""
from __future__ import annotations

import importlib

_LAZY = {"ToyResult": "fit", "save_model": "fit", "train_task": "fit", "train_toy": "fit",
         "ToyTransformer": "model", "ToyData": "data"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
