"""Training on an activation store: LightningCLI over :class:`StoreDataModule`, with YAML configs in train/configs/.

    from headprobe.train.fit import fit
    result = fit("linear", "capitals.h5", "runs/capitals-linear", {"model": {"init_args": {"l2": 0.5}}})
    result.metrics["val/acc_max"], result.checkpoint

``headprobe train`` (:mod:`headprobe.train.train_cli`) is the same on the command line:

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
Every setting (the trainer's limits, the data module's, ``--out``, ``--config`` files, the store, ``last.ckpt``) is
checked before anything is written or trained, each refusal one line; ``last.ckpt`` is read without unpickling.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from headprobe import HeadprobeError
from headprobe.train.callbacks import ExportRun, HoldConsole, SaveLast
from headprobe.train.options import one_line, parse_error
from headprobe.train.data import StoreDataModule

CONFIGS = Path(__file__).resolve().parent / "configs"
# short-form name -> (module that must exist, config file naming the model class)
MODELS = {"linear": ("headprobe.probes.linear", "linear.yaml"), "sparse": ("headprobe.probes.sparse", "sparse.yaml"),
          "sae": ("headprobe.probes.sae", "sae.yaml")}
LOGGERS = ("wandb", "csv", "none")
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
        parser.add_argument("--command", type=str, default="", help="the command that reproduces this run, recorded "
                            "in the checkpoint (default: this process's command line)")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Check every setting of the run before anything is written, then build the trainer with the run's
        logger, folder and callbacks through LightningCLI's public ``instantiate_trainer(**kwargs)``."""
        cfg, trainer = self.config, dict(self.config_init.get("trainer") or {})
        out = Path(cfg.out)
        check_before_training(cfg, {**trainer, **kwargs}, self.model, self.datamodule)
        if cfg.overwrite and not cfg.resume:
            remove_run_files(out)
        if kwargs.get("logger", trainer.get("logger")) in (None, True):
            kwargs["logger"] = make_logger(cfg.logger, out, cfg.project, resume=cfg.resume)
        theirs = kwargs.get("callbacks", trainer.get("callbacks")) or []
        kwargs["callbacks"] = [*(theirs if isinstance(theirs, list) else [theirs]), SaveLast(str(out / "checkpoints")),
                               ExportRun(str(out), when="test" if cfg.test else "fit", command=cfg.command or None)]
        kwargs["default_root_dir"] = str(out)
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # a Trainer setting check_trainer does not know of
            raise TrainError(f"--trainer: {one_line(err).rstrip('.!')}: change that --trainer setting "
                             f"(`headprobe train NAME --help` lists them)") from None


def check_before_training(cfg, trainer: dict, model, datamodule) -> None:
    """Refuse, in one line and before anything is written, every setting the run would fail on or waste."""
    out = Path(cfg.out)
    if cfg.logger not in LOGGERS:
        raise TrainError(f"--logger {cfg.logger!r}: choose one of {', '.join(LOGGERS)}")
    check_out(out)
    held = [p.relative_to(out) for p in (out / "checkpoints" / "last.ckpt", out / "checkpoint") if p.exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} holds a run ({held[0]}): pass --resume true to continue it, --overwrite true "
                         f"to replace it, or another --out")
    check_trainer(trainer)
    if cfg.test and not len(datamodule.split_rows["test"]):
        raise TrainError(f"{datamodule.path}: the test split holds no rows: extract more examples, or pass "
                         f"--test false")
    if cfg.resume:
        ckpt = out / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise TrainError(f"--resume: {ckpt} does not exist; run without --resume to start training")
        check_resume(ckpt, model, datamodule, full=True)


def check_out(out: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: pass a folder for the run's files")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir():
        raise TrainError(f"--out {out}: {parent} is a file, so the folder cannot be made: pass another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {parent} is not writable: pass a folder you can write to")


# Trainer setting -> (smallest value, what would work); -1 means "no limit" where Lightning allows it
TRAINER_BOUNDS = {"max_epochs": (1, "1 or more, or -1 for no limit"), "max_steps": (1, "1 or more, or -1 for no limit"),
                  "min_epochs": (0, "0 or more"), "min_steps": (0, "0 or more"),
                  "check_val_every_n_epoch": (1, "1 or more"), "accumulate_grad_batches": (1, "1 or more"),
                  "log_every_n_steps": (0, "0 or more")}


def check_trainer(trainer: dict) -> None:
    """Refuse trainer limits that Lightning rejects with a traceback, or that would train nothing."""
    for key, (least, works) in TRAINER_BOUNDS.items():
        value = trainer.get(key)
        if value is None or (value == -1 and "-1" in works) or isinstance(value, bool) or value >= least:
            continue
        nothing = " trains nothing" if value == 0 and key in ("max_epochs", "max_steps") else ""
        raise TrainError(f"--trainer.{key} {value}{nothing}: pass {works}")
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit <= 0:
        raise TrainError(f"--trainer.limit_train_batches {limit} trains nothing: pass a number of batches (1 or "
                         f"more) or a fraction of them (above 0, up to 1.0)")


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


def train(args: list[str] | dict) -> HeadprobeCLI:
    """Parse, check, fit (resuming if asked), test and export; returns the CLI (its .trainer and .model).

    Lightning's console lines (the seed, the devices) are held back until training starts, so that a setting
    refused before then prints only its one-line error."""
    with HoldConsole() as hold:
        cli = make_cli(args, hold)
        ckpt = Path(cli.config.out) / "checkpoints" / "last.ckpt" if cli.config.resume else None
        with warnings.catch_warnings():
            # by design: the closed-form probes (Newton, FISTA) take no torch optimizer; a Lightning-internal notice
            warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True if ckpt else None)
            if cli.config.test:
                cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if cli.config.logger == "wandb":  # close the run: the next training in this process starts its own
        import wandb

        wandb.finish()
    return cli


def make_cli(args: list[str] | dict, hold: HoldConsole) -> HeadprobeCLI:
    """Parse ``args`` (a command line's options, or a configuration dict) and build the model, the data module and
    the trainer (every setting checked)."""
    with warnings.catch_warnings():  # args are passed on purpose, not read from sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        try:
            return HeadprobeCLI(model_class=None, datamodule_class=StoreDataModule, subclass_mode_model=True,
                                save_config_callback=LogConfig, save_config_kwargs={"overwrite": True}, run=False,
                                trainer_defaults={"callbacks": [hold]}, args=args,
                                parser_kwargs={"prog": "headprobe train", "exit_on_error": False})
        except ArgumentError as err:
            raise TrainError(f"{parse_error(err)} (`headprobe train NAME --help` lists the options)") from None
        except ValueError as err:  # a class refused its settings; jsonargparse wraps the message in its own
            raise TrainError(parse_error(err)) from None


# settings a resumed run may change: they do not alter what it computes
RESUME_FREE = {"num_workers", "memory_limit_gb", "n_boot"}
# settings a module fills in from the data at setup; a new run holds their placeholder (0, None, "auto") until then
RESOLVED_AT_SETUP = {"n_layers", "n_groups", "n_features", "n_classes", "n_heads", "d_head", "d_in", "d_sae", "loss"}


def read_last(ckpt: Path) -> dict:
    """``last.ckpt`` as a dict of tensors and plain values, never unpickling objects; a damaged or foreign file is
    refused in one line."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns of an unusual pickle protocol before refusing the file
            warnings.simplefilter("ignore")
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except Exception as err:  # torch's errors on a hostile or damaged file suggest weights_only=False: never show it
        kind = "holds objects other than tensors and plain values" if "weights_only" in str(err) else "is damaged"
        raise TrainError(f"--resume: {ckpt} {kind}, so it is not a checkpoint of `headprobe train`: train afresh "
                         f"with --overwrite true (which deletes it), or pass another --out") from None
    if not isinstance(saved, dict):
        raise TrainError(f"--resume: {ckpt} is not a Lightning checkpoint (it holds a {type(saved).__name__}): "
                         f"train afresh with --overwrite true, or pass another --out")
    return saved


LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict", "loops")  # what a resume reads


def check_resume(ckpt: Path, model, datamodule, full: bool = False) -> None:
    """Refuse to resume ``ckpt`` with other model or data settings than it was trained with (one line naming the
    first difference). Settings a module derives from the data are skipped while they hold their placeholder.
    ``full``: also require what Lightning reads to resume (a dict of settings alone passes otherwise)."""
    saved = read_last(ckpt)
    missing = [key for key in LIGHTNING_KEYS if full and key not in saved]
    if missing:
        raise TrainError(f"--resume: {ckpt} is not a whole Lightning checkpoint (no {missing[0]!r}): train afresh "
                         f"with --overwrite true, or pass another --out")
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


# --- the Python API: fit(kind, store, out, overrides) -> FitResult ---------------------------------------------------
def deep_merge(base: dict, *overlays: dict) -> dict:
    """``base`` with each overlay's values on top, dicts merged key by key (lists and values replaced)."""
    out = dict(base)
    for overlay in overlays:
        for key, value in overlay.items():
            out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else value
    return out


def merged_config(kind: str, overrides: dict | None = None, configs: list[str] | None = None) -> dict:
    """The configuration a ``kind`` training runs with: its packaged YAML (train/configs/KIND.yaml), then each of
    ``configs`` (file names in train/configs/, or paths), then ``overrides`` (a nested dict such as
    ``{"model": {"init_args": {"alpha": 0.1}}, "data": {"batch_size": 64}}``)."""
    import yaml

    if kind not in MODELS:
        raise TrainError(f"unknown model {kind!r}: choose one of {', '.join(MODELS)}")
    files = [CONFIGS / MODELS[kind][1], *(Path(c) if Path(c).is_absolute() else CONFIGS / c for c in configs or [])]
    layers = []
    for path in files:
        if not path.is_file():
            raise TrainError(f"{path} is missing: reinstall headprobe, or pass your own configuration")
        layers.append(yaml.safe_load(path.read_text()) or {})
    return deep_merge(*layers, overrides or {})


@dataclass
class FitResult:
    """A finished training: its run folder (``checkpoint/``, ``heads.json``, ``heatmap.png``, logs), the configuration
    it ran with and the metrics its checkpoint records."""

    kind: str
    out: Path
    config: dict
    metrics: dict

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"

    @classmethod
    def load(cls, out: str | Path, kind: str = "", config: dict | None = None) -> "FitResult":
        """The result of the training whose run folder is ``out``."""
        import json

        out = Path(out)
        metrics = json.loads((out / "checkpoint" / "metrics.json").read_text())
        return cls(kind, out, config or {}, metrics)

    def scalars(self) -> dict[str, float]:
        """The scalar metrics (the per-head tables left out)."""
        return {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def head_table(self) -> list[dict]:
        """One row per (layer, head): every per-head score the module reported (``heads.json``)."""
        import json

        return json.loads((self.out / "heads.json").read_text())["heads"]


def fit(kind: str, store: str | Path, out: str | Path, overrides: dict | None = None, *,
        configs: list[str] | None = None, logger: str = "wandb", seed: int = 0, resume: bool = False,
        overwrite: bool = False, test: bool = True, quiet: bool = False) -> FitResult:
    """Train ``kind`` (linear, sparse or sae) on ``store`` into ``out`` with its packaged configuration, ``configs``
    and ``overrides`` on top (see :func:`merged_config`); ``headprobe train`` runs the same with options. ``quiet``
    keeps Lightning's per-run console lines (devices, seed, tips) down, for one training of many."""
    import logging

    config = merged_config(kind, overrides, configs)
    command = (f"headprobe.train.fit.fit({kind!r}, {str(store)!r}, {str(out)!r}, {overrides or {}!r}"
               + "".join(f", {k}={v!r}" for k, v in (("configs", configs), ("seed", seed)) if v) + ")")
    args = deep_merge(config, {"data": {"path": str(store)}, "out": str(out), "logger": logger, "command": command,
                               "seed_everything": seed, "resume": resume, "overwrite": overwrite, "test": test})
    logs = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")] if quiet else []
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(max(log.level, logging.WARNING))
    try:
        train(args)
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return FitResult.load(out, kind, config)
