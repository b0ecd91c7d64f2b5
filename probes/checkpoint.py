"""The project's one checkpoint format, used by every probe and sparse autoencoder.

A checkpoint is a flat folder::

    model.safetensors   the module's tensors (normalisation already folded in)
    config.json         CheckpointConfig: class, hyperparameters, where the activations came from, and the
                        sha256 of model.safetensors
    metrics.json        what the run measured (val/test metrics, per-head tables)
    README.md           a model card

Loading reads JSON and safetensors only: nothing is unpickled and no code from the checkpoint runs. Classes are
looked up by name in :data:`CLASSES`, filled by :func:`register`; a class name never leads to an import other
than the project's own :data:`BUILTIN_MODULES`.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from headprobe import HeadprobeError

FORMAT_VERSION = 1
FILES = ("model.safetensors", "config.json", "metrics.json", "README.md")
CLASSES: dict[str, type] = {}
# imported when a class name is not yet known
BUILTIN_MODULES = ("headprobe.probes.linear", "headprobe.probes.sparse", "headprobe.probes.sae", "headprobe.probes.steering")


class CheckpointError(HeadprobeError, RuntimeError):
    """A checkpoint that cannot be read, or does not fit the data; the message says what to do."""


def register(cls: type) -> type:
    """Class decorator: make ``cls`` loadable by name. It must define ``from_checkpoint(config, tensors)``
    (:class:`headprobe.probes.hub.FromPretrained` adds ``Cls.from_pretrained(ref)``)."""
    if not callable(getattr(cls, "from_checkpoint", None)):
        raise TypeError(f"{cls.__name__} needs a from_checkpoint(config, tensors) classmethod to be registered")
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
    command: str = ""  # the command line that reproduces this checkpoint
    data: dict = field(default_factory=dict)  # the training store: dataset hash, extraction settings, rows
    tensors_sha256: str = ""  # sha256 of model.safetensors, filled by save_checkpoint
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_store(cls, meta, class_name: str, hparams: dict, **extra) -> "CheckpointConfig":
        """Fill the provenance fields from a :class:`extract.store.StoreMeta`."""
        data = {"dataset_hash": meta.dataset_hash, "extract_config": meta.config, "position_rule": meta.position_rule,
                "store_dtype": meta.dtype, "n_examples": meta.n_examples, "n_rows": meta.n_rows}
        return cls(cls=class_name, hparams=hparams, model_id=meta.model_id, weights_hash=meta.weights_hash,
                   architecture=meta.architecture, hook_point=meta.hook_point, layers=list(meta.layers),
                   n_heads=meta.n_heads, d_head=meta.d_head, task=meta.task, stage=meta.stage,
                   label_names=list(meta.label_names), **{"data": data, **extra})

    def check_compatible(self, meta) -> None:
        """Refuse activations (a StoreMeta or another CheckpointConfig) from another model, hook point or head
        layout than the checkpoint was trained on; the message names both."""
        same = (self.weights_hash == meta.weights_hash and self.hook_point == meta.hook_point
                and (self.n_heads, self.d_head) == (meta.n_heads, meta.d_head) and set(self.layers) <= set(meta.layers))
        if not same:
            raise CheckpointError(
                f"checkpoint was trained on {self.model_id} (weights {self.weights_hash}, {self.hook_point}, "
                f"layers {self.layers}, {self.n_heads}x{self.d_head}) but the activations come from {meta.model_id} "
                f"(weights {meta.weights_hash}, {meta.hook_point}, layers {list(meta.layers)}, "
                f"{meta.n_heads}x{meta.d_head}): extract with the checkpoint's model and layers")


def init_hparams(module) -> dict:
    """The module's hyperparameters that its constructor takes (LightningCLI adds bookkeeping keys), tuples as lists."""
    names = inspect.signature(type(module).__init__).parameters
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in module.hparams.items() if k in names}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every checkpoint file present in ``folder`` (what a registry entry records)."""
    folder = Path(folder)
    return {name: sha256(folder / name) for name in FILES if (folder / name).is_file()}


def json_safe(value):
    """``value`` with numpy scalars as floats and NaN or infinite floats as None, so that any JSON parser (a web
    hub's browser included) reads it; containers are walked."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], config: CheckpointConfig,
                    metrics: dict | None = None, card: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint folder; returns it. ``config.tensors_sha256`` is filled in. ``dtype`` (e.g.
    torch.float16 for shipped checkpoints) casts the floating-point tensors; loaders cast back on copy."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in tensors.items()}
    save_file(tensors, folder / "model.safetensors")
    config = replace(config, tensors_sha256=sha256(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(json_safe(metrics or {}), indent=2, default=float,
                                                    allow_nan=False) + "\n")
    (folder / "README.md").write_text(card or default_card(config, metrics or {}))
    return folder


def export(module, folder: str | Path, meta=None, metrics: dict | None = None, command: str = "",
           data: dict | None = None) -> Path:
    """Write a trained module as a checkpoint folder through its export protocol: ``checkpoint_tensors()`` (tensors
    on raw activations, normalisation folded in), ``checkpoint_config(meta)`` (``meta``: the training store's
    StoreMeta) and, unless ``metrics`` is given, ``checkpoint_metrics()``. ``data`` adds to the config's record of
    the training data (e.g. rows per split)."""
    config = module.checkpoint_config(meta)
    config.command = command or config.command
    config.data.update(data or {})
    if metrics is None:
        metrics = module.checkpoint_metrics() if hasattr(module, "checkpoint_metrics") else {}
    return save_checkpoint(folder, module.checkpoint_tensors(), config, metrics)


def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The scalar entries of a metrics dict, nested dicts flattened as ``outer/inner`` (tables are left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, dict)):
            continue
        if isinstance(v, dict):
            out.update(scalar_metrics(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_card(config: CheckpointConfig, metrics: dict) -> str:
    scalar = scalar_metrics(metrics)
    heads = "all heads" if config.heads is None else f"heads {config.heads}"
    lines = [f"# {config.cls} on {config.model_id}", "",
             f"- task: {config.task or '-'} (stage {config.stage or '-'}), labels {config.label_names or '-'}",
             f"- hook point: `{config.hook_point}`, layers {config.layers}, {heads}, "
             f"{config.n_heads} heads x {config.d_head}",
             f"- weights hash of the model: `{config.weights_hash}`",
             f"- hyperparameters: `{json.dumps(config.hparams)}`"]
    if config.normalisation:
        lines.append(f"- input normalisation (folded into the weights): `{json.dumps(config.normalisation)}`")
    lines.append("")
    if config.command:
        lines += ["Reproduce with:", "", "```", config.command, "```", ""]
    if scalar:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in scalar.items()] + [""]
    lines += ["Load with `headprobe.load(path_or_id)`; the format is described in docs/checkpoints.md.", ""]
    return "\n".join(lines)


def _verify(path: Path, digest: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: fetch the checkpoint again")
    if sha256(path) != digest:
        raise CheckpointError(f"{path} does not match its recorded sha256 (tampered, truncated or partly "
                              f"downloaded): delete it and fetch it again")


def read_checkpoint(folder: str | Path, expected_sha256: dict[str, str] | None = None
                    ) -> tuple[CheckpointConfig, dict[str, torch.Tensor], dict]:
    """(config, tensors, metrics) of a checkpoint folder. Every file named in ``expected_sha256`` is verified
    before it is read, and model.safetensors always against the sha256 recorded in config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass a checkpoint folder, a registry id or a hub repo id")
    for name in ("model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a headprobe checkpoint ({name} is missing)")
    for name, digest in (expected_sha256 or {}).items():
        _verify(folder / name, digest)
    try:
        raw = json.loads((folder / "config.json").read_text())
        known = {f.name for f in fields(CheckpointConfig)}
        config = CheckpointConfig(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is not a valid checkpoint config ({err}): "
                              f"fetch it again") from None
    if config.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{folder} uses checkpoint format {config.format_version}; upgrade headprobe")
    if not config.tensors_sha256:
        raise CheckpointError(f"{folder / 'config.json'} records no tensors_sha256, so model.safetensors cannot be "
                              f"verified: save the checkpoint with headprobe.probes.checkpoint.export")
    _verify(folder / "model.safetensors", config.tensors_sha256)
    try:
        tensors = load_file(folder / "model.safetensors")
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{folder / 'model.safetensors'} is corrupt or truncated ({err}): fetch it again") from None
    metrics_path = folder / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{metrics_path} is not valid JSON ({err}): fetch it again") from None
    return config, tensors, metrics


@dataclass
class Checkpoint:
    """A checkpoint folder as read by :func:`read_checkpoint` (verified; nothing instantiated)."""

    folder: Path
    config: CheckpointConfig
    tensors: dict[str, torch.Tensor]
    metrics: dict

    @classmethod
    def read(cls, folder: str | Path, expected_sha256: dict[str, str] | None = None) -> "Checkpoint":
        return cls(Path(folder), *read_checkpoint(folder, expected_sha256))


def checkpoint_class(name: str) -> type:
    """The registered class called ``name``; the project's own probe modules are imported on first use."""
    for module in BUILTIN_MODULES:
        if name in CLASSES:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    if name not in CLASSES:
        raise CheckpointError(f"unknown checkpoint class {name!r} (known: {', '.join(sorted(CLASSES)) or 'none'}): "
                              f"upgrade headprobe or import the module that defines it")
    return CLASSES[name]


def load_local(folder: str | Path, expected_sha256: dict[str, str] | None = None) -> torch.nn.Module:
    """Instantiate the module saved in a local checkpoint folder (verified as in :func:`read_checkpoint`).

    The module gets ``checkpoint_config_loaded`` and ``checkpoint_metrics_loaded`` attributes (names chosen not
    to shadow the ``checkpoint_config()`` / ``checkpoint_metrics()`` methods of the probe and SAE classes)."""
    config, tensors, metrics = read_checkpoint(folder, expected_sha256)
    cls = checkpoint_class(config.cls)
    try:
        module = cls.from_checkpoint(config, tensors)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder}: the tensors or hyperparameters do not fit {config.cls} ({first}): "
                              f"the checkpoint is corrupt or from another headprobe version") from None
    module.checkpoint_config_loaded, module.checkpoint_metrics_loaded = config, metrics
    return module


class PretrainedMixin:
    """Checkpoint methods for a torch module whose constructor takes ``config.hparams`` and whose state_dict is
    exactly what it saves. Subclasses may override :meth:`from_checkpoint`; use with ``@register`` (and
    :class:`headprobe.probes.hub.FromPretrained` for ``from_pretrained``)."""

    @classmethod
    def from_checkpoint(cls, config: CheckpointConfig, tensors: dict[str, torch.Tensor]):
        module = cls(**config.hparams)
        module.load_state_dict(tensors, strict=True)
        return module

    def save_pretrained(self, folder: str | Path, config: CheckpointConfig, metrics: dict | None = None,
                        card: str | None = None) -> Path:
        """Write this module's state_dict as a checkpoint folder described by ``config``."""
        if config.cls != type(self).__name__:
            config = replace(config, cls=type(self).__name__)
        return save_checkpoint(folder, self.state_dict(), config, metrics, card)
