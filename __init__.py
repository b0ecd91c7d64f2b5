"""headprobe: what do a language model's attention heads do? The public Python API.

This folder is the installed package ``headprobe`` (pyproject.toml maps it); its stage folders are subpackages:

    headprobe.extract   model -> HDF5 store of per-head outputs
    headprobe.probes    probes and sparse autoencoders, their checkpoints, attribution to heads and stages
    headprobe.train     training (LightningCLI), the whole pipeline (``headprobe run``) and its report

Names are imported lazily, so ``import headprobe`` stays cheap.
"""
from __future__ import annotations

import importlib


class HeadprobeError(Exception):
    """An error the user can cause and fix (bad input, a missing file, settings that cannot work); its message is
    one line that says what to do. The command line prints only these as one line; anything else is a bug and
    shows its traceback (``--debug`` or ``HEADPROBE_DEBUG=1`` shows it for these too)."""


class InputError(HeadprobeError, ValueError):
    """Settings, options or data that cannot work (a negative batch size, a split with no rows, an unknown
    name); the message names the option or file and what would work."""


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
    "load_model": "headprobe.extract.models",
    "extract_store": ("headprobe.extract.extractor", "extract"),  # headprobe.extract is the stage's package
    "fit": "headprobe.train.fit",
    "FitResult": "headprobe.train.fit",
    "run": "headprobe.train.pipeline",
    "RunConfig": "headprobe.train.pipeline",
    "RunResult": "headprobe.train.pipeline",
    "Attribution": "headprobe.probes.attribution",
    "ExtractConfig": "headprobe.extract.extractor",
    "Store": "headprobe.extract.store",
    "get_task": "headprobe.extract.tasks",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'headprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, "HeadprobeError", "InputError"])
