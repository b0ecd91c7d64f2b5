"""Where the data shipped with headprobe lives: ``datasets/`` (task data and cards) and ``checkpoints/`` (the
checkpoint hub's registry and checkpoints).

Both sit in the ``headprobe`` package folder: the repository root in a clone or an editable install, and
``site-packages/headprobe/`` in a regular install (pyproject.toml ships them as package data). Neither is ever a
top-level package: one named ``datasets`` would shadow Hugging Face's library.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the headprobe package: the repository, or site-packages/headprobe


def shipped_folder(name: str) -> Path:
    """The folder of shipped ``name`` ("datasets" or "checkpoints")."""
    if name not in ("datasets", "checkpoints"):
        raise ValueError(f"unknown shipped folder {name!r}: choose datasets or checkpoints")
    return ROOT / name
