"""``headprobe train``: LightningCLI over the activation store, with YAML configs in train/configs/.

    headprobe train linear --data.path capitals.h5 --out runs/capitals-linear
    headprobe train sparse --data.path capitals.h5 --model.alpha 0.05 --logger csv
    headprobe train sae --data.path corpus.h5 --print_config
    headprobe train --config my.yaml --data.path capitals.h5          (long form: any LightningModule)

The short form ``headprobe train NAME`` loads train/configs/NAME.yaml (model class + defaults); every option can be
overridden on the command line. A run writes into ``--out``: ``checkpoints/last.ckpt`` after every epoch (exact
resume with ``--resume true``: weights, solver/optimiser state, RNG, and the epoch that fixes the data order),
``checkpoint/`` in the project format, ``heads.csv``/``heads.json``, ``heatmap.png``, ``config.yaml`` (with
``--logger csv`` next to the CSV logger's metrics.csv, in its version folder: ``csv/``, and ``csv/resume-N/`` for
the N-th resume), and the logger's files (W&B by default, offline without credentials; ``--logger csv`` or
``none``). A folder that holds a run is refused unless ``--resume true`` or ``--overwrite true`` says what to do.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger

from headprobe import HeadprobeError
from headprobe.train.callbacks import ExportRun, SaveLast
from headprobe.train.cli import parse_error
from headprobe.train.data import StoreDataModule

CONFIGS = Path(__file__).resolve().parent / "configs"
# short-form name -> (module that must exist, config file naming the model class)
MODELS = {"linear": ("headprobe.probes.linear", "linear.yaml"), "sparse": ("headprobe.probes.sparse", "sparse.yaml"),
          "sae": ("headprobe.probes.sae", "sae.yaml")}
LOGGERS = ("wandb", "csv", "none")
USAGE = """usage: headprobe train {linear,sparse,sae} --data.path STORE.h5 --out DIR [options]
       headprobe train --config FILE.yaml [options]

Train per-head linear probes, a group-lasso sparse probe or a sparse autoencoder on an activation store
(LightningCLI; NAME loads train/configs/NAME.yaml). Options of the data module, the run and the Lightning Trainer:
`headprobe train linear --help`; of a model: `headprobe train linear --model.help LinearProbes` (SparseProbe,
SparseAutoencoder); a whole configuration: `headprobe train linear --print_config`."""


class TrainError(HeadprobeError, ValueError):
    """Bad `headprobe train` input; the message says what to do."""


class LogConfig(SaveConfigCallback):
    """Write config.yaml into the trainer's log folder (the run folder, or the CSV logger's version folder) and log
    the full config to the loggers (W&B config)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.clone().as_dict() if hasattr(self.config, "clone") else dict(self.config)
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class HeadprobeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--out", type=str, default="runs/train", help="run folder")
        parser.add_argument("--logger", type=str, default="wandb", help="wandb (default; offline without "
                            "credentials), csv or none; --trainer.logger overrides it")
        parser.add_argument("--project", type=str, default="headprobe", help="W&B project")
        parser.add_argument("--resume", type=bool, default=False, help="continue from <out>/checkpoints/last.ckpt")
        parser.add_argument("--overwrite", type=bool, default=False, help="train afresh into an --out that holds a "
                            "run, deleting that run's files first")
        parser.add_argument("--test", type=bool, default=True, help="evaluate on the test split after fitting")

    def instantiate_trainer(self, **kwargs):
        cfg = self.config
        out = Path(cfg.out)
        if cfg.logger not in LOGGERS:
            raise TrainError(f"--logger {cfg.logger!r}: choose one of {', '.join(LOGGERS)}")
        held = [p.relative_to(out) for p in (out / "checkpoints" / "last.ckpt", out / "checkpoint") if p.exists()]
        if held and not (cfg.resume or cfg.overwrite):
            raise TrainError(f"{out} holds a run ({held[0]}): pass --resume true to continue it, --overwrite true "
                             f"to replace it, or another --out")
        if cfg.overwrite and not cfg.resume:
            remove_run_files(out)
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_cfg.get("logger") in (None, True):
            trainer_cfg["logger"] = make_logger(cfg.logger, out, cfg.project, resume=cfg.resume)
        trainer_cfg["default_root_dir"] = str(out)
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        extra += [SaveLast(str(out / "checkpoints")), ExportRun(str(out), when="test" if cfg.test else "fit")]
        return self._instantiate_trainer(trainer_cfg, extra)


RUN_FILES = ("checkpoints", "checkpoint", "csv", "wandb", "heads.csv", "heads.json", "heatmap.png", "config.yaml")


def remove_run_files(out: Path) -> None:
    """Delete what a training run writes into ``out`` (for --overwrite); other files stay."""
    for name in RUN_FILES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def make_logger(kind: str, out: Path, project: str, resume: bool = False) -> Logger | bool:
    if kind == "none":
        return False
    if kind == "csv":  # a resume logs into a folder of its own: Lightning empties a reused one's metrics.csv
        n = 1 + sum(1 for _ in (out / "csv").glob("resume-*")) if resume else 0
        return CSVLogger(save_dir=str(out), name="csv", version=f"resume-{n}" if n else "")
    from headprobe.train.loggers import WandbLogger

    return WandbLogger(save_dir=str(out), project=project)


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
    """Parse, fit (resuming if asked), test and export; returns the CLI (its .trainer and .model)."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # no "Seed set to N" line before a refusal
    seed_level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():  # argv is sys.argv minus `headprobe train`, passed on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            cli = HeadprobeCLI(model_class=None, datamodule_class=StoreDataModule, subclass_mode_model=True,
                               save_config_callback=LogConfig, save_config_kwargs={"overwrite": True}, run=False,
                               args=argv, parser_kwargs={"prog": "headprobe train", "exit_on_error": False})
        except ArgumentError as err:
            raise TrainError(f"{parse_error(err)} (`headprobe train NAME --help` lists the options)") from None
        except ValueError as err:  # a class refused its settings; jsonargparse wraps the message in its own
            raise TrainError(parse_error(err)) from None
        finally:
            seed_log.setLevel(seed_level)
    out = Path(cli.config.out)
    if cli.config.test and not len(cli.datamodule.split_rows["test"]):
        raise TrainError(f"{cli.datamodule.path}: the test split holds no rows: extract more examples, or pass "
                         f"--test false")
    ckpt = None
    if cli.config.resume:
        ckpt = out / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise TrainError(f"--resume: {ckpt} does not exist; run without --resume to start training")
        check_resume(ckpt, cli.model, cli.datamodule)
    with warnings.catch_warnings():
        # by design: the closed-form probes (Newton, FISTA) take no torch optimizer; and a Lightning-internal notice
        warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True if ckpt else None)
        if cli.config.test:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if cli.config.logger == "wandb":  # close the run: the next training in this process starts its own
        import wandb

        wandb.finish()
    return cli


# settings a resumed run may change: they do not alter what it computes
RESUME_FREE = {"num_workers", "memory_limit_gb", "n_boot"}
# settings a module fills in from the data at setup; a new run holds their placeholder (0, None, "auto") until then
RESOLVED_AT_SETUP = {"n_layers", "n_groups", "n_features", "n_classes", "n_heads", "d_head", "d_in", "d_sae", "loss"}


def check_resume(ckpt: Path, model, datamodule) -> None:
    """Refuse to resume ``ckpt`` with other model or data settings than it was trained with (one line naming the
    first difference). Settings a module derives from the data are skipped while they hold their placeholder."""
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    for what, now, before in (("model", dict(model.hparams), saved.get("hyper_parameters") or {}),
                              ("data", dict(datamodule.hparams), saved.get("datamodule_hyper_parameters") or {})):
        for key, old in before.items():
            if key.startswith("_") or key in RESUME_FREE or key not in now:
                continue
            new = now[key]
            if key in RESOLVED_AT_SETUP and (new is None or new == "auto" or (type(new) is int and new == 0)):
                continue  # not filled in yet
            if key == "path" and Path(old).exists() and Path(new).exists() and os.path.samefile(old, new):
                continue
            if old != new:
                raise TrainError(f"--resume: {ckpt} was trained with --{what}.{key} {old}, this run asks for {new}: "
                                 f"resume with the same settings, or train into another --out")
    stored = (saved.get(type(datamodule).__qualname__) or {}).get("store")  # absent before headprobe saved it
    why = stored and datamodule.meta.mismatch(stored)
    if why:
        raise TrainError(f"--resume: {datamodule.path} is not the store {ckpt} was trained on (it was rebuilt: {why}): "
                         f"resume on the original store, or train into another --out")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    from headprobe.train.cli import guarded

    guarded("headprobe", lambda: run(expand_short_form(argv)))  # TrainError is a ValueError


if __name__ == "__main__":
    main()
