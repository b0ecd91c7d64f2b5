"""What a training run leaves behind, as Lightning callbacks shared by probes and SAEs.

:class:`HoldConsole` holds Lightning's console lines back until training starts (a refused setting prints one line).

:class:`SaveLast` keeps ``checkpoints/last.ckpt`` (for exact resume) up to date at every epoch end.

:class:`ExportRun` writes, into ``out``::

    checkpoint/        the project checkpoint format (headprobe.probes.checkpoint.export)
    heads.csv          one row per (layer, head): every per-head score the module reports
    heads.json         the same table, plus the module's metrics
    heatmap.png        layer x head map of the main score (test accuracy, else val accuracy, else the first score)

and, with a W&B logger, logs the heatmap as an image and the checkpoint folder as a ``model`` artifact.

The protocol a LightningModule implements to be exported (only the first two are required)::

    checkpoint_tensors() -> dict[str, Tensor]      tensors that act on raw activations (normalisation folded in)
    checkpoint_config(meta) -> CheckpointConfig    provenance and hyperparameters; ``meta`` is the store's StoreMeta
    checkpoint_metrics() -> dict                   JSON-able metrics for metrics.json (default: the logged scalars)
    head_scores() -> dict[str, ndarray (L, G)]     per-head maps for heads.csv / heatmap.png (G = heads, or 1)
    layers: list[int]                              model layer numbers of the rows of those maps (optional)
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path

import lightning as L
import numpy as np

from headprobe.probes.checkpoint import export, read_checkpoint

HEATMAP_KEYS = ("test/acc", "val/acc", "test/r2", "val/r2")


def heatmap(scores: np.ndarray, path: str | Path, title: str, layers: list[int] | None = None) -> Path:
    """A layer x head heatmap PNG of ``scores`` (L, G)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ln, G = scores.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * G + 2), max(3.0, 0.22 * Ln + 1.5)), dpi=100)
    im = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    ticks = list(range(0, Ln, max(1, Ln // 15)))
    ax.set_yticks(ticks, [str((layers or list(range(Ln)))[t]) for t in ticks])
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_head_table(scores: dict[str, np.ndarray], folder: Path, layers: list[int], metrics: dict) -> None:
    """heads.csv and heads.json from (L, G) maps."""
    maps = {k: np.asarray(v) for k, v in scores.items() if np.ndim(v) == 2}
    if not maps:
        return
    Ln, G = next(iter(maps.values())).shape
    rows = [{"layer": layers[i] if i < len(layers) else i, "head": j if G > 1 else "all",
             **{k: float(v[i, j]) for k, v in maps.items() if v.shape == (Ln, G)}} for i in range(Ln) for j in range(G)]
    with open(folder / "heads.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "heads.json").write_text(json.dumps({"heads": rows, "metrics": metrics}, indent=1, default=float))


LIGHTNING_CONSOLE = ("lightning.pytorch", "lightning.fabric")  # the loggers Lightning's console lines go through


class _Keep(logging.Handler):
    """Appends each record, with the logger it is to be replayed through, to a list."""

    def __init__(self, logger: logging.Logger, held: list):
        super().__init__()
        self.logger, self.held = logger, held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append((self.logger, record))


class HoldConsole(L.Callback):
    """Hold Lightning's console lines (the seed, the devices, tips) from ``with HoldConsole():`` until training
    starts (``on_fit_start``, after the data and model ``setup`` hooks), then print them in order. An error before
    that drops them, so a refused setting prints only its one-line error."""

    def __init__(self, names: tuple[str, ...] = LIGHTNING_CONSOLE):
        self.names, self.held, self.saved = names, [], []

    def __enter__(self) -> "HoldConsole":
        for name in self.names:
            logger = logging.getLogger(name)
            self.saved.append((logger, list(logger.handlers), logger.propagate))
            for handler in self.saved[-1][1]:
                logger.removeHandler(handler)
            logger.addHandler(_Keep(logger, self.held))
            logger.propagate = False
        return self

    def release(self) -> None:
        """Give the loggers back their handlers and print what was held."""
        saved, self.saved = self.saved, []
        for logger, handlers, propagate in saved:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = propagate
        held, self.held[:] = list(self.held), []
        for logger, record in held:
            logger.handle(record)

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.held.clear()
        self.release()

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.release()


class SaveLast(L.Callback):
    """Write ``<dirpath>/last.ckpt`` (Lightning's full training state) at every epoch end, atomically.

    Unlike ModelCheckpoint it also saves for solvers that take no optimizer steps (global_step stays 0)."""

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state: resume needs optimiser, loops and RNG
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


class ExportRun(L.Callback):
    """Export the checkpoint folder, per-head tables and heatmap at the end of fit (``when="fit"``) or of test.

    Args:
        out: the run folder.
        when: "fit" or "test" (test metrics then land in the tables).
        log_artifact: log the checkpoint folder as a W&B artifact.
        command: the command line recorded in the checkpoint (default: this process's).
    """

    def __init__(self, out: str = "runs/train", when: str = "test", log_artifact: bool = True,
                 command: str | None = None):
        if when not in ("fit", "test"):
            raise ValueError(f"ExportRun(when={when!r}): choose fit or test")
        self.out, self.when, self.log_artifact = Path(out), when, log_artifact
        self.command = command if command is not None else " ".join(["headprobe", *sys.argv[1:]])
        self.exported: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.when == "fit":
            self.export(trainer, module)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.when == "test":
            self.export(trainer, module)

    def export(self, trainer: L.Trainer, module: L.LightningModule) -> Path:
        if not trainer.is_global_zero:
            return self.out / "checkpoint"
        self.out.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        metrics = (module.checkpoint_metrics() if hasattr(module, "checkpoint_metrics")
                   else {k: float(v) for k, v in trainer.callback_metrics.items()})
        rows = {k: int(len(v)) for k, v in getattr(datamodule, "split_rows", {}).items()}  # for attribution's nulls
        folder = export(module, self.out / "checkpoint", getattr(datamodule, "meta", None), metrics, self.command,
                        {"split_rows": rows} if rows else None)
        config = read_checkpoint(folder)[0]
        scores = module.head_scores() if hasattr(module, "head_scores") else {}
        layers = list(getattr(module, "layers", None) or config.layers)
        write_head_table(scores, self.out, layers, {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
        maps = {k: v for k, v in scores.items() if np.ndim(v) == 2}
        if maps:
            key = next((k for k in HEATMAP_KEYS if k in maps), next(iter(maps)))
            png = heatmap(np.asarray(maps[key], dtype=float), self.out / "heatmap.png",
                          f"{config.cls} {config.task}: {key}", layers)
            self._log_wandb(trainer, png, folder, config)
        else:
            self._log_wandb(trainer, None, folder, config)
        self.exported = folder
        return folder

    def _log_wandb(self, trainer: L.Trainer, png: Path | None, folder: Path, config) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            if png is not None:
                logger.log_image(key="heatmap", images=[str(png)], step=trainer.global_step)
            if self.log_artifact:
                name = f"{config.cls}-{config.task or 'data'}-{logger.experiment.id}".replace("/", "-")
                artifact = wandb.Artifact(name, type="model", metadata={"model_id": config.model_id,
                                                                        "task": config.task})
                artifact.add_dir(str(folder))
                logger.experiment.log_artifact(artifact)
