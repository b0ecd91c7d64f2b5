"""``headprobe run``: the whole pipeline on the default model (grows with each stage)."""
from __future__ import annotations

import argparse
from pathlib import Path

from extract.extractor import ExtractConfig, extract
from extract.models import DEFAULT_MODEL, load_model
from extract.tasks import get_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("runs/default"))
    p.add_argument("--tasks", default="capitals", help="comma-separated task names")


def run(args: argparse.Namespace) -> None:
    loaded = load_model(args.model)
    for name in args.tasks.split(","):
        path = extract(loaded, get_task(name), args.out / "stores" / f"{name}.h5", ExtractConfig(), resume=True)
        print(f"{name}: {path}")
