"""The ``headprobe`` command: one subcommand per pipeline stage.

    headprobe extract   model -> HDF5 store          (extract.cli)
    headprobe tasks     list the built-in tasks      (extract.tasks.cli)
    headprobe train     probes and SAEs (LightningCLI)  (train.fit)
    headprobe attribute checkpoints -> stage map     (headprobe.probes.attribution)
    headprobe hub       list / show / push checkpoints  (headprobe.probes.hub)
    headprobe run       the whole pipeline           (train.pipeline)
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from typing import Callable

from headprobe import HeadprobeError

# subcommand -> (module with add_arguments(parser) and run(args), or main(argv) for pass-through; help)
COMMANDS = {
    "extract": ("headprobe.extract.cli", "extract per-head activations of a model into an HDF5 store"),
    "tasks": ("headprobe.extract.tasks.cli", "list the built-in probing tasks"),
    "train": ("headprobe.train.fit", "train probes or sparse autoencoders (LightningCLI; see `headprobe train -h`)"),
    "attribute": ("headprobe.probes.attribution.cli", "map trained probes and SAEs to heads and reasoning stages"),
    "hub": ("headprobe.probes.hub.cli", "list, show and publish checkpoints"),
    "scores": ("headprobe.probes.checks.scores_cli", "training-free head scores (retrieval, negative, copying, "
                                                     "successor, induction) of a model, with nulls and stages"),
    "run": ("headprobe.train.pipeline", "the whole pipeline on the default model, with a report"),
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


def one_line(err: BaseException) -> str:
    """An error's first line; an OS error on a path says which path and what to do."""
    if isinstance(err, OSError) and not isinstance(err, HeadprobeError):
        where = err.filename or "a file"
        if err.errno == errno.ENOSPC:
            return f"{where}: no space left on the device: free some space (finished work is kept), then run again"
        if err.strerror:
            return f"{where}: {err.strerror.lower()}: pass another path"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def parse_error(err: Exception) -> str:
    """jsonargparse's many-line parse error as one line: the innermost option and what was wrong with it."""
    message = str(err)
    keys = re.findall(r'Parser key "([^"]+)":', message)
    if not keys and not message.startswith("Does not validate"):
        return one_line(err)
    lines = [re.sub(r"^\s*- ", "", line).strip() for line in
             (message.split(f'Parser key "{keys[-1]}":', 1)[1] if keys else message).strip().splitlines()]
    clean = lambda text: re.sub(r"(?:a )?typing\.Literal\[(.*?)\]", r"one of \1", re.sub(
        r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)).replace("NoneType", "null")
    noise = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given class_path", "Expected a")
    specific = [line for line in lines if line and not line.startswith(noise)]
    got = next((line for line in lines if ". Got value: " in line), None)
    expected = [clean(m) for line in lines for m in re.findall(r"Expected a (<class '[\w.]+'>)", line)]
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), "")
    detail = (clean(got) if got else specific[0] if specific
              else f"expected {' or '.join(expected)}, got {given!r}" if expected else lines[0])
    return f"--{'.'.join(keys)}: {detail}" if keys else detail


def guarded(prog: str, work: Callable[[], object]) -> None:
    """Run ``work``; a user's error exits 2 with one line, Ctrl-C exits 130 with one line. With ``--debug`` or
    ``HEADPROBE_DEBUG=1`` user errors raise with their traceback."""
    try:
        work()
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
    if "--debug" in argv:  # tracebacks for user errors too
        argv.remove("--debug")
        os.environ["HEADPROBE_DEBUG"] = "1"
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
    cmd = argparse.ArgumentParser(prog=f"headprobe {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    guarded("headprobe", lambda: module.run(args))


if __name__ == "__main__":
    main()
