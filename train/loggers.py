"""Weights & Biases as the default logger, offline unless credentials exist; and a reader for offline runs.

:class:`WandbLogger` sets W&B's environment before wandb starts: ``WANDB_MODE=offline`` when the user has not
chosen a mode and has no credentials (no ``WANDB_API_KEY``, no api.wandb.ai entry in ~/.netrc), and
``WANDB_DIR``, ``WANDB_CACHE_DIR``, ``WANDB_CONFIG_DIR``, ``WANDB_DATA_DIR`` under the run folder (so nothing is
written to ~/.cache or ~/.config) unless the user set them. Offline, wandb makes no network connection; the run
folder ``<save_dir>/wandb/offline-run-*/`` holds ``run-<id>.wandb`` and can be uploaded later with ``wandb sync``.
"""
from __future__ import annotations

import netrc
import os
import struct
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

WANDB_HOST = "api.wandb.ai"


def has_credentials() -> bool:
    """Whether wandb could log in: WANDB_API_KEY, or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://" + WANDB_HOST).split("://")[-1].split("/")[0]
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_environment(save_dir: str | Path) -> dict[str, str]:
    """Set (and return) the W&B environment for a run whose files go under ``save_dir``."""
    root = Path(save_dir).resolve()
    env = {"WANDB_DIR": str(root), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_DATA_DIR": str(root / "wandb-data")}
    if not os.environ.get("WANDB_MODE") and not has_credentials():
        env["WANDB_MODE"] = "offline"
    for key, value in env.items():
        os.environ.setdefault(key, value)
        if key != "WANDB_MODE":
            Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in env}


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger with headprobe's offline-first environment (see the module docstring)."""

    def __init__(self, save_dir: str = "runs/train", project: str = "headprobe", name: str | None = None,
                 log_model: bool = False, **kwargs):
        wandb_environment(save_dir)
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")  # "disabled" is wandb's own: no files
        super().__init__(save_dir=save_dir, project=project, name=name, offline=offline, log_model=log_model,
                         **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns that the setting (None here) has no effect
            self._wandb_init.pop("anonymous", None)


# --- reading an offline run back -----------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7  # the .wandb file is a LevelDB-style log: 7-byte file header, 32 KiB blocks


def read_run_records(path: str | Path) -> list:
    """Every record (``wandb.proto.wandb_internal_pb2.Record``) of a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pos, parts = [], _HEADER, []
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += room
            continue
        parts.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def read_offline_run(run_dir: str | Path) -> dict:
    """The logged history rows (key -> JSON value string), config items and artifact names of an offline run."""
    import json

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    history, config, artifacts = [], {}, []
    for rec in read_run_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in rec.history.item})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "artifact":
            artifacts.append(rec.artifact.name)
        elif kind == "request" and rec.request.WhichOneof("request_type") == "log_artifact":
            artifacts.append(rec.request.log_artifact.artifact.name)
    return {"history": history, "config": config, "artifacts": artifacts}
