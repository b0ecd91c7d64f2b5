"""Where the data shipped with headprobe lives: ``datasets/`` (task data and cards) and ``checkpoints/`` (the
checkpoint hub's registry and checkpoints).

In a clone or an editable install they are the repository's top-level folders. A regular install (a wheel) puts
them next to the packages as ``headprobe_datasets/`` and ``headprobe_checkpoints/`` (mapped in pyproject.toml;
never as ``datasets``, which would shadow Hugging Face's library).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository, or site-packages


def shipped_folder(name: str) -> Path:
    """The folder of shipped ``name`` ("datasets" or "checkpoints")."""
    if name not in ("datasets", "checkpoints"):
        raise ValueError(f"unknown shipped folder {name!r}: choose datasets or checkpoints")
    installed = ROOT / f"headprobe_{name}"
    if installed.is_dir() or not (ROOT / "pyproject.toml").is_file():
        return installed  # a regular install (never site-packages/datasets, which is Hugging Face's library)
    return ROOT / name
