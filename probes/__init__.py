"""Stage 2-4: probes and sparse autoencoders on per-head outputs, their checkpoints, and attribution to heads.

Names are imported lazily so that ``import probes`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "headprobe.probes.hub",
    "CheckpointConfig": "headprobe.probes.checkpoint",
    "CheckpointError": "headprobe.probes.checkpoint",
    "save_checkpoint": "headprobe.probes.checkpoint",
    "read_checkpoint": "headprobe.probes.checkpoint",
    "LinearProbes": "headprobe.probes.linear",
    "SparseProbe": "headprobe.probes.sparse",
    "SparseAutoencoder": "headprobe.probes.sae",
    "evidence_from_checkpoints": "headprobe.probes.attribution",
    "attribute": "headprobe.probes.attribution",
    "AttributionConfig": "headprobe.probes.attribution",
    "write_attribution": "headprobe.probes.attribution",
    "build_stage_map": "headprobe.probes.attribution.stage_map",
    "write_stage_map": "headprobe.probes.attribution.stage_map",
    "head_type_scores": "headprobe.probes.checks.head_scores",
    "HeadAblation": "headprobe.probes.checks.ablation",
    "causal_check": "headprobe.probes.checks.ablation",
    "causal_checks": "headprobe.probes.checks.ablation",
    "readout_metric": "headprobe.probes.checks.readout",
    "steer": "headprobe.probes.steering",
    "Intervention": "headprobe.probes.steering",
    "build_intervention": "headprobe.probes.steering",
    "steer_sweep": "headprobe.probes.checks.steer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
