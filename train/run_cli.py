"""``headprobe run``: the command over :func:`headprobe.train.pipeline.run` (options from :class:`RunConfig`)."""
from __future__ import annotations

import sys

from headprobe.train.cli import guarded
from headprobe.train.options import expand_bare_flags, parse_error
from headprobe.train.pipeline import RunConfig, run, run_config

FLAGS = {"--progress", "--attribution.head_scores"}  # yes/no options that also work without a value


def expand_quick(argv: list[str]) -> list[str]:
    """``--quick`` -> ``--config train/configs/run_quick.yaml`` (in place, so later options override it)."""
    from headprobe.train.fit import CONFIGS

    return [a for arg in argv for a in (["--config", str(CONFIGS / "run_quick.yaml")] if arg == "--quick" else [arg])]


def parse(argv: list[str]) -> RunConfig:
    """The RunConfig of a command line (a one-line InputError for a bad option)."""
    from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

    from headprobe import InputError

    parser = ArgumentParser(prog="headprobe run", description=__doc__.splitlines()[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below "
                        "(--print_config prints the current configuration)")
    parser.add_argument("--quick", action="store_true", help="a quick run: one task per stage, 100 examples each, "
                        "a small SAE (train/configs/run_quick.yaml; a few minutes on 2 CPU cores)")
    parser.add_class_arguments(RunConfig, nested_key=None, fail_untyped=False)
    try:
        args = parser.parse_args(expand_bare_flags(expand_quick(argv), FLAGS)).as_dict()
    except ArgumentError as err:
        raise InputError(f"{parse_error(err)} (`headprobe run --help` lists the options)") from None
    args = {k: v for k, v in args.items() if k not in ("config", "quick") and not k.startswith("__")}
    return run_config(args)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    guarded("headprobe run", lambda: run(parse(argv)))
