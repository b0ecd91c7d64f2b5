"""The project's one checkpoint format, used by every probe and sparse autoencoder.

A checkpoint is a folder::

    model.safetensors   the module's tensors (normalisation already folded in)
    config.json         CheckpointConfig: class, hyperparameters, and where the activations came from
    metrics.json        what the run measured (val/test metrics, per-head tables)
    README.md           a model card

Loading reads JSON and safetensors only: nothing is unpickled and no code from the checkpoint runs. Classes are
looked up in :data:`CLASSES`, filled by :func:`register`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.json", "metrics.json", "README.md")
CLASSES: dict[str, type] = {}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the data; the message says what to do."""


def register(cls: type) -> type:
    """Class decorator: make ``cls`` loadable by name. It must define ``from_checkpoint(config, tensors)``."""
    CLASSES[cls.__name__] = cls
    return cls


@dataclass
class CheckpointConfig:
    cls: str  # registered class name
    hparams: dict  # JSON-able constructor arguments
    model_id: str
    weights_hash: str
    architecture: str
    hook_point: str
    layers: list[int]  # model layers the module reads, in storage order
    n_heads: int
    d_head: int
    task: str = ""
    stage: str = ""
    label_names: list[str] = field(default_factory=list)
    heads: list[int] | None = None  # None: every head of each layer
    normalisation: dict = field(default_factory=dict)  # how inputs were scaled (already folded into weights)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_store(cls, meta, class_name: str, hparams: dict, **extra) -> "CheckpointConfig":
        """Fill the provenance fields from a :class:`extract.store.StoreMeta`."""
        return cls(cls=class_name, hparams=hparams, model_id=meta.model_id, weights_hash=meta.weights_hash,
                   architecture=meta.architecture, hook_point=meta.hook_point, layers=list(meta.layers),
                   n_heads=meta.n_heads, d_head=meta.d_head, task=meta.task, stage=meta.stage,
                   label_names=list(meta.label_names), **extra)

    def check_compatible(self, meta) -> None:
        """Refuse activations from another model, hook point or head layout than the checkpoint was trained on."""
        mine = (self.model_id, self.weights_hash, self.hook_point, self.n_heads, self.d_head)
        theirs = (meta.model_id, meta.weights_hash, meta.hook_point, meta.n_heads, meta.d_head)
        if self.weights_hash != meta.weights_hash or mine[2:] != theirs[2:] or not set(self.layers) <= set(meta.layers):
            raise CheckpointError(
                f"checkpoint was trained on {self.model_id} (weights {self.weights_hash}, {self.hook_point}, "
                f"layers {self.layers}, {self.n_heads}x{self.d_head}) but the activations come from {meta.model_id} "
                f"(weights {meta.weights_hash}, {meta.hook_point}, layers {meta.layers}, {meta.n_heads}x{meta.d_head}):"
                f" extract with the checkpoint's model and layers")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], config: CheckpointConfig,
                    metrics: dict | None = None, card: str | None = None) -> Path:
    """Write a checkpoint folder; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=float) + "\n")
    (folder / "README.md").write_text(card or default_card(config, metrics or {}))
    return folder


def default_card(config: CheckpointConfig, metrics: dict) -> str:
    scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    lines = [f"# {config.cls} on {config.model_id}", "",
             f"- task: {config.task or '-'} (stage {config.stage or '-'})",
             f"- hook point: `{config.hook_point}`, layers {config.layers}, {config.n_heads} heads x {config.d_head}",
             f"- weights hash of the model: `{config.weights_hash}`",
             f"- hyperparameters: `{json.dumps(config.hparams)}`", ""]
    if scalar:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in scalar.items()] + [""]
    lines += ["Load with `probes.load(path)`; the format is described in docs/checkpoints.md.", ""]
    return "\n".join(lines)


def read_checkpoint(folder: str | Path, expected_sha256: dict[str, str] | None = None
                    ) -> tuple[CheckpointConfig, dict[str, torch.Tensor], dict]:
    """(config, tensors, metrics) of a checkpoint folder; files are verified against ``expected_sha256``."""
    folder = Path(folder)
    for name in ("model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a headprobe checkpoint ({name} is missing)")
    for name, digest in (expected_sha256 or {}).items():
        if not (folder / name).is_file() or sha256(folder / name) != digest:
            raise CheckpointError(f"{folder / name} does not match its recorded sha256 (tampered, truncated or "
                                  f"partly downloaded): delete it and fetch it again")
    try:
        raw = json.loads((folder / "config.json").read_text())
        known = {f.name for f in fields(CheckpointConfig)}
        config = CheckpointConfig(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is not a valid checkpoint config: {err}") from None
    if config.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{folder} uses checkpoint format {config.format_version}; upgrade headprobe")
    try:
        tensors = load_file(folder / "model.safetensors")
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{folder / 'model.safetensors'} is corrupt or truncated ({err}): fetch it again") from None
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return config, tensors, metrics


def load_local(folder: str | Path, expected_sha256: dict[str, str] | None = None):
    """Instantiate the module saved in a local checkpoint folder."""
    config, tensors, metrics = read_checkpoint(folder, expected_sha256)
    if config.cls not in CLASSES:
        raise CheckpointError(f"{folder}: unknown checkpoint class {config.cls!r} (known: {', '.join(sorted(CLASSES))})"
                              f"; upgrade headprobe or import the module that defines it")
    module = CLASSES[config.cls].from_checkpoint(config, tensors)
    module.checkpoint_metrics = metrics
    return module
