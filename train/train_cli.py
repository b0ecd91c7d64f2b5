"""``headprobe train``: the command line of :mod:`headprobe.train.fit`.

    headprobe train linear --data.path capitals.h5 --out runs/capitals-linear
    headprobe train sparse --data.path capitals.h5 --model.alpha 0.05 --logger csv
    headprobe train sae --data.path corpus.h5 --print_config
    headprobe train --config my.yaml --data.path capitals.h5          (long form: any LightningModule)

The short form ``headprobe train NAME`` loads train/configs/NAME.yaml (model class + defaults); every option can be
overridden on the command line. Yes/no options (``--resume``, ``--overwrite``, ``--test``) work alone or with a
value (``--resume``, ``--resume true``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from headprobe.train.cli import guarded
from headprobe.train.fit import CONFIGS, MODELS, HeadprobeCLI, TrainError, train
from headprobe.train.options import expand_bare_flags

FLAGS = {"--resume", "--overwrite", "--test"}


USAGE = """usage: headprobe train {linear,sparse,sae} --data.path STORE.h5 --out DIR [options]
       headprobe train --config FILE.yaml [options]

Train per-head linear probes, a group-lasso sparse probe or a sparse autoencoder on an activation store
(LightningCLI; NAME loads train/configs/NAME.yaml). Options of the data module, the run and the Lightning Trainer:
`headprobe train linear --help`; of a model: `headprobe train linear --model.help LinearProbes` (SparseProbe,
SparseAutoencoder); a whole configuration: `headprobe train linear --print_config`."""


def expand_short_form(argv: list[str]) -> list[str]:
    """``NAME rest...`` -> ``--config train/configs/NAME.yaml rest...``; the model's module must exist."""
    if argv and not argv[0].startswith("-") and argv[0] not in MODELS:
        raise TrainError(f"unknown model {argv[0]!r}: choose one of {', '.join(MODELS)}, or pass --config FILE")
    if not argv or argv[0] not in MODELS:
        return argv
    module, config = MODELS[argv[0]]
    if importlib.util.find_spec(module) is None:
        raise TrainError(f"`headprobe train {argv[0]}` needs {module}, which this installation lacks: "
                         f"update headprobe")
    path = CONFIGS / config
    if not path.exists():
        raise TrainError(f"{path} is missing: reinstall headprobe, or pass --config with your own file")
    return ["--config", str(path), *argv[1:]]


def run(argv: list[str]) -> HeadprobeCLI:
    """``headprobe train`` with the options ``argv`` (after the short form is expanded)."""
    check_config_files(argv)
    return train(expand_bare_flags(argv, FLAGS))


def check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE`` must exist and hold a YAML mapping (jsonargparse's own errors do not name the file)."""
    import yaml

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise TrainError(f"--config {name} " + ("is a folder" if path.is_dir() else "does not exist") +
                             ": pass a YAML file (`headprobe train linear --print_config` writes a whole one)")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}" if where else ""
            raise TrainError(f"--config {name} is not valid YAML{at}: fix the file (`headprobe train linear "
                             f"--print_config` writes a valid one)") from None
        if not isinstance(config, dict):
            raise TrainError(f"--config {name} holds no settings (a YAML mapping such as `model: ...`, `data: ...`): "
                             f"`headprobe train linear --print_config` writes a whole one")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    guarded("headprobe", lambda: run(expand_short_form(argv)))


if __name__ == "__main__":
    main()
