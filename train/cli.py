"""The ``headprobe`` command: one subcommand per pipeline stage.

    headprobe extract   model -> HDF5 store          (extract.cli)
    headprobe tasks     list the built-in tasks      (extract.tasks.cli)
    headprobe train     probes and SAEs (LightningCLI)  (headprobe.train.train_cli)
    headprobe attribute checkpoints -> stage map     (headprobe.probes.attribution)
    headprobe hub       list / show / push checkpoints  (headprobe.probes.hub)
    headprobe run       the whole pipeline           (headprobe.train.run_cli)
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Callable

from headprobe import HeadprobeError
from headprobe.train.options import one_line

# subcommand -> (module with add_arguments(parser) and run(args), or main(argv) for pass-through; help)
COMMANDS = {
    "extract": ("headprobe.extract.cli", "extract per-head activations of a model into an HDF5 store"),
    "tasks": ("headprobe.extract.tasks.cli", "list the built-in probing tasks"),
    "train": ("headprobe.train.train_cli",
              "train probes or sparse autoencoders (LightningCLI; see `headprobe train -h`)"),
    "attribute": ("headprobe.probes.attribution.cli", "map trained probes and SAEs to heads and reasoning stages"),
    "hub": ("headprobe.probes.hub.cli", "list, show and publish checkpoints"),
    "scores": ("headprobe.probes.checks.scores_cli", "training-free head scores (retrieval, negative, copying, "
                                                     "successor, induction) of a model, with nulls and stages"),
    "steer": ("headprobe.probes.checks.steer_cli", "steer a model along a task's probe directions, against controls"),
    "run": ("headprobe.train.run_cli", "the whole pipeline on the default model, with a report"),
}


def debug() -> bool:
    """Whether tracebacks are wanted for user errors too (``--debug`` anywhere on the command line, or
    ``HEADPROBE_DEBUG=1``)."""
    return os.environ.get("HEADPROBE_DEBUG", "").lower() in ("1", "true", "yes")


def known_errors() -> tuple[type[BaseException], ...]:
    """What the command line prints as one line: errors the user caused (:class:`headprobe.HeadprobeError`) and
    file-system errors on a path (a full disk, a read-only or missing folder). Anything else is a bug: its
    traceback shows."""
    return (HeadprobeError, OSError)


def guarded(prog: str, work: Callable[[], object]) -> None:
    """Run ``work``; a user's error exits 2 with one line, Ctrl-C exits 130 with one line, and a closed pipe on
    stdout (``headprobe hub list | head``) ends quietly. With ``--debug`` or ``HEADPROBE_DEBUG=1`` user errors
    raise with their traceback."""
    try:
        work()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        sys.exit(0)
    except known_errors() as err:
        if debug() or (isinstance(err, OSError) and not isinstance(err, HeadprobeError) and not err.filename
                       and err.errno != errno.ENOSPC):
            raise  # an OS error without a path is not the user's to fix from one line
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; finished work is kept: run the same command again to go on "
              f"(`headprobe extract` needs --resume)", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in argv:
        return dispatch(argv)
    argv.remove("--debug")  # tracebacks for user errors too, for this command only
    before = os.environ.get("HEADPROBE_DEBUG")
    os.environ["HEADPROBE_DEBUG"] = "1"
    try:
        dispatch(argv)
    finally:
        os.environ.pop("HEADPROBE_DEBUG") if before is None else os.environ.update(HEADPROBE_DEBUG=before)


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) that points at ``--help``; exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        sys.exit(2)


def dispatch(argv: list[str]) -> None:
    """Run the subcommand ``argv[0]`` (its module's ``main``, or ``add_arguments`` and ``run``)."""
    parser = argparse.ArgumentParser(prog="headprobe", description="What do a language model's attention heads do? "
                                     "(--debug anywhere, or HEADPROBE_DEBUG=1: tracebacks for errors too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["-h"])
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if hasattr(module, "main"):  # the subcommand parses its own arguments (LightningCLI and friends)
        return module.main(argv[1:])
    cmd = OneLineParser(prog=f"headprobe {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    guarded("headprobe", lambda: module.run(args))


if __name__ == "__main__":
    main()
