"""The ``headprobe`` command: one subcommand per pipeline stage.

    headprobe extract   model -> HDF5 store          (extract.cli)
    headprobe tasks     list the built-in tasks      (extract.tasks.cli)
    headprobe train     probes and SAEs (LightningCLI)  (train.fit)
    headprobe attribute checkpoints -> stage map     (probes.attribution_cli)
    headprobe hub       list / show / push checkpoints  (probes.hub_cli)
    headprobe run       the whole pipeline           (train.pipeline)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module with add_arguments(parser) and run(args), or main(argv) for pass-through; help)
COMMANDS = {
    "extract": ("extract.cli", "extract per-head activations of a model into an HDF5 store"),
    "tasks": ("extract.tasks.cli", "list the built-in probing tasks"),
    "train": ("train.fit", "train probes or sparse autoencoders (LightningCLI; see `headprobe train -h`)"),
    "attribute": ("probes.attribution_cli", "map trained probes and SAEs to heads and reasoning stages"),
    "hub": ("probes.hub_cli", "list, show and publish checkpoints"),
    "run": ("train.pipeline", "the whole pipeline on the default model, with a report"),
}


def known_errors() -> tuple[type[Exception], ...]:
    """The errors headprobe raises for bad input, whose message says what to do: printed as one line."""
    from extract.extractor import ExtractError
    from extract.models import ModelLoadError
    from extract.store import StoreError
    from extract.tasks import TaskError
    from probes.checkpoint import CheckpointError

    return ModelLoadError, ExtractError, StoreError, TaskError, CheckpointError, FileNotFoundError, ValueError


def _error(msg: str) -> None:
    print(f"headprobe: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="headprobe", description="What do a language model's attention heads do?")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["-h"])
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if hasattr(module, "main"):  # the subcommand parses its own arguments (LightningCLI and friends)
        return module.main(argv[1:])
    cmd = argparse.ArgumentParser(prog=f"headprobe {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        module.run(args)
    except known_errors() as err:
        _error(str(err))


if __name__ == "__main__":
    main()
