"""Train a toy model and save it as a Hugging Face model folder: :func:`train_toy` (modules in hand) and
:func:`train_task` (a task's shipped config, with overrides); ``headprobe toy train`` is a thin wrapper.

A run writes into ``out``::

    model/                 the trained model: config.json, model.safetensors, the tokenizer, toy_training.json
                           (the training record: settings, curves, final scores) and phase_change.png
    checkpoints/last.ckpt  Lightning's full state at the last checkpoint (``resume=True`` continues from it)
    wandb/ or csv/         the logger's files (W&B offline without credentials)

``model/`` is written when training ends, complete or not at all (written aside, then renamed into place). A
folder that holds a run is refused unless ``resume`` or ``overwrite`` says what to do.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headprobe import HeadprobeError, InputError
from headprobe.train.toy import record
from headprobe.train.toy.data import ToyData
from headprobe.train.toy.model import ToyTransformer, symbol_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_FILES = ("model", "checkpoints", "csv", "wandb", "config.yaml")
LOGGERS = ("wandb", "csv", "none")


class ToyTrainError(HeadprobeError, ValueError):
    """Bad ``headprobe toy train`` input; the message says what to do."""


@dataclass
class ToyResult:
    """What a toy training produced: the model folder and its final measurements."""

    folder: Path  # the saved Hugging Face model folder (out/model)
    task: str
    steps: int
    seconds: float  # training time, checkpoints' measurements included (summed over resumed segments)
    losses: dict[str, float]  # final loss per mask of the evaluation batch ("first"/"second" copy, or "all")
    scores: dict[str, np.ndarray]  # final (L, H) head scores (record.head_scores)
    jobs: dict[str, dict]  # per job of the task: the best head ({"layer", "head", "score", "done"})
    phase_change_step: int | None


def config_path(task: str) -> Path:
    """train/configs/toy_TASK.yaml."""
    path = CONFIGS / f"toy_{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem[4:] for p in CONFIGS.glob("toy_*.yaml"))
        raise ToyTrainError(f"--task {task!r}: no config {path.name}; choose one of {', '.join(known)}, or pass "
                            f"--config FILE")
    return path


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    held = [p for p in (out / "checkpoints" / "last.ckpt", out / "model") if p.exists()]
    if held and not (resume or overwrite):
        raise ToyTrainError(f"{out} holds a run ({held[0].relative_to(out)}): pass --resume true to continue it, "
                            f"--overwrite true to replace it, or another --out")
    if resume and not (out / "checkpoints" / "last.ckpt").is_file():
        raise ToyTrainError(f"--resume: {out / 'checkpoints' / 'last.ckpt'} does not exist; run without --resume to "
                            f"start training")
    if overwrite and not resume:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _check_resume(ckpt: Path, module: ToyTransformer, data: ToyData) -> None:
    """Refuse to resume with other model or data settings than the checkpoint was trained with."""
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    for what, now, before in (("model", module.hparams, saved.get("hyper_parameters") or {}),
                              ("data", data.hparams, saved.get("datamodule_hyper_parameters") or {})):
        for key, old in before.items():
            if key in now and now[key] != old:
                raise ToyTrainError(f"--resume: {ckpt} was trained with --{what}.{key} {old}, this run asks for "
                                    f"{now[key]}: resume with the same settings, or train into another --out")


def _logger(kind: str, out: Path, project: str, resume: bool):
    if kind not in LOGGERS:
        raise ToyTrainError(f"--logger {kind!r}: choose one of {', '.join(LOGGERS)}")
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        n = 1 + sum(1 for _ in (out / "csv").glob("resume-*")) if resume else 0
        return CSVLogger(save_dir=str(out), name="csv", version=f"resume-{n}" if n else "")
    from headprobe.train.loggers import WandbLogger

    return WandbLogger(save_dir=str(out), project=project)


def _trainer(out: Path, steps: int, eval_every: int, logger, progress: bool, overrides: dict):
    import lightning as L

    from headprobe.train.callbacks import SaveLast

    settings = {"max_epochs": steps // eval_every, "logger": logger, "enable_checkpointing": False,
                "num_sanity_val_steps": 0, "reload_dataloaders_every_n_epochs": 1, "gradient_clip_val": 1.0,
                "enable_progress_bar": progress, "enable_model_summary": False, "default_root_dir": str(out),
                "log_every_n_steps": min(eval_every, 50), **overrides}
    return L.Trainer(callbacks=[SaveLast(str(out / "checkpoints"))], **settings)


def build_record(module: ToyTransformer, data: ToyData, command: str = "") -> dict:
    """The training record of a trained ``module`` (see :mod:`.record`)."""
    import torch
    import transformers

    curves = module.curves
    final = curves[-1]["scores"]
    return {"format": record.RECORD_FORMAT, "task": module.task.name, "description": module.task.description,
            "probing_task": module.task.probing_task, "jobs": list(module.task.jobs),
            "model": {k: v for k, v in module.hparams.items() if k != "task"},
            "data": {k: v for k, v in data.hparams.items() if k != "task"},
            "steps": int(curves[-1]["step"]), "seconds": float(curves[-1]["seconds"]),
            "final_loss": curves[-1]["loss"], "job_heads": record.job_heads(final, module.task.jobs),
            "phase_change_step": record.phase_change_step(curves), "command": command,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "curves": curves}


def save_model(module: ToyTransformer, data: ToyData, folder: Path, command: str = "") -> dict:
    """Save the network, the tokenizer, the training record and the phase-change plot as the Hugging Face model
    folder ``folder``, replacing it only once the new one is complete. Returns the record."""
    folder = Path(folder)
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one tiny shard: no "Writing model shards" bar
    try:
        module.net.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    symbol_tokenizer().save_pretrained(tmp)
    rec = build_record(module, data, command)
    record.write_record(tmp, rec)
    record.plot_phase_change(rec, tmp / "phase_change.png")
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return rec


def train_toy(module: ToyTransformer, data: ToyData, out: str | Path, steps: int, logger: str = "wandb",
              project: str = "headprobe", resume: bool = False, overwrite: bool = False, progress: bool = True,
              trainer: dict | None = None, command: str = "") -> ToyResult:
    """Train ``module`` on ``data`` for ``steps`` steps in all (a multiple of ``data.eval_every``) into ``out``
    (see the module docstring); with ``resume`` continue from ``out/checkpoints/last.ckpt``. ``trainer``: extra
    Lightning Trainer settings."""
    if module.task.name != data.task.name:
        raise InputError(f"the module is for task {module.task.name!r}, the data for {data.task.name!r}")
    if steps < 1 or steps % data.eval_every:
        raise ToyTrainError(f"--steps {steps}: pass a positive multiple of --data.eval_every ({data.eval_every})")
    out = Path(out)
    _check_out(out, resume, overwrite)
    ckpt = out / "checkpoints" / "last.ckpt" if resume else None
    if ckpt is not None:
        _check_resume(ckpt, module, data)
    out.mkdir(parents=True, exist_ok=True)
    run_logger = _logger(logger, out, project, resume)
    fitter = _trainer(out, steps, data.eval_every, run_logger, progress, trainer or {})
    with warnings.catch_warnings():  # one process makes the batches: the length of the IterableDataset is exact
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        fitter.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=False if ckpt else None)
    if not module.curves or module.curves[-1]["step"] != fitter.global_step:
        raise ToyTrainError(f"training stopped at step {fitter.global_step} before a checkpoint: run again with "
                            f"--resume true")
    rec = save_model(module, data, out / "model", command)
    if logger == "wandb":
        import wandb

        run_logger.log_image(key="phase_change", images=[str(out / "model" / "phase_change.png")])
        wandb.finish()
    final = module.curves[-1]
    return ToyResult(out / "model", module.task.name, rec["steps"], rec["seconds"], dict(final["loss"]),
                     {k: np.asarray(v) for k, v in final["scores"].items()}, rec["job_heads"],
                     rec["phase_change_step"])


def task_config(task: str) -> dict:
    """The shipped configuration of a toy task (train/configs/toy_TASK.yaml) as a dict."""
    import yaml

    return yaml.safe_load(config_path(task).read_text())


def train_task(task: str, out: str | Path, steps: int | None = None, model: dict | None = None,
               data: dict | None = None, **kwargs) -> ToyResult:
    """Train ``task`` with its shipped configuration, ``model``/``data`` settings overriding it; ``steps``
    defaults to the config's. Other keyword arguments go to :func:`train_toy`."""
    cfg = task_config(task)
    data_cfg = {**cfg.get("data", {}), **(data or {}), "task": task}
    module = ToyTransformer(task=task, **{**cfg.get("model", {}), **(model or {})})
    trainer = {**cfg.get("trainer", {}), **kwargs.pop("trainer", {})}
    return train_toy(module, ToyData(**data_cfg), out, steps or cfg["steps"], trainer=trainer, **kwargs)
