"""Stage 2-4: probes and sparse autoencoders on per-head outputs, their checkpoints, and attribution to heads.

Names are imported lazily so that ``import probes`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "probes.hub",
    "CheckpointConfig": "probes.checkpoint",
    "CheckpointError": "probes.checkpoint",
    "save_checkpoint": "probes.checkpoint",
    "read_checkpoint": "probes.checkpoint",
    "LinearProbes": "probes.linear",
    "SparseProbe": "probes.sparse",
    "SparseAutoencoder": "probes.sae",
    "evidence_from_checkpoints": "probes.attribution",
    "build_stage_map": "probes.stage_map",
    "write_stage_map": "probes.stage_map",
    "head_type_scores": "probes.head_scores",
    "HeadAblation": "probes.ablation",
    "causal_check": "probes.ablation",
    "causal_checks": "probes.ablation",
    "readout_metric": "probes.readout",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
