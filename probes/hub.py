"""Find, fetch, verify and publish checkpoints: ``probes.load(ref)``.

A reference is one of

- a local checkpoint folder;
- a registry id ``release/name``, looked up in the registry file (``checkpoints/registry.json`` by default, or the
  ``hub=`` argument: a folder holding a ``registry.json`` or an ``http(s)://`` base URL);
- an ``http(s)://BASE/release/name`` URL of a static hub: ``BASE/registry.json`` plus one folder per checkpoint,
  servable by any web server or object store; files are cached under ``$HEADPROBE_CACHE/hubs``;
- a Hugging Face Hub repo ``org/name`` or ``hf:org/name[/subfolder][@revision]``, fetched with huggingface_hub
  (its cache, ``HF_HUB_OFFLINE`` and tokens apply).

Every file is checked against a sha256 before it is read: the registry's for registry ids and static hubs, the
blob hashes huggingface_hub stored for Hub repos, and always the sha256 of model.safetensors in config.json (a
config without one is refused).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from headprobe.extract.shipped import shipped_folder
from headprobe.probes.checkpoint import (
    FILES,
    CheckpointError,
    file_hashes,
    load_local,
    read_checkpoint,
    scalar_metrics,
    sha256,
)

REGISTRY_FILE = "registry.json"
REGISTRY_VERSION = 1
PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # one path component: no '..', no '/', no leading dot
ID_RE = re.compile(rf"{PART}/{PART}")
HF_RE = re.compile(rf"(?P<repo>{PART}/{PART})(?P<sub>(?:/{PART})*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?")
TIMEOUT_S = 30


def bundled_registry() -> Path:
    """The registry shipped with headprobe (``$HEADPROBE_REGISTRY`` overrides it)."""
    env = os.environ.get("HEADPROBE_REGISTRY")
    return Path(env) if env else shipped_folder("checkpoints") / REGISTRY_FILE


def check_id(ref: str) -> str:
    """``ref`` if it is a safe ``release/name`` id; a one-line error otherwise (path traversal included)."""
    if not ID_RE.fullmatch(ref):
        raise CheckpointError(f"invalid checkpoint id {ref!r}: ids are 'release/name' made of letters, digits, "
                              f"'.', '_' and '-' (no '..', no leading '/' or '.')")
    return ref


def _check_part(value: str, what: str) -> str:
    if not re.fullmatch(PART, value):
        raise CheckpointError(f"registry entry has an unsafe {what} {value!r}: the registry is corrupt or hostile")
    return value


@dataclass
class RegistryEntry:
    """One checkpoint in a registry file."""

    location: str  # folder relative to the registry, or "hf:org/repo[/subfolder]"
    sha256: dict[str, str]  # file name -> sha256, for every file of the checkpoint
    revision: str = ""  # Hugging Face revision for hf: locations; a release label otherwise
    cls: str = ""
    model_id: str = ""
    weights_hash: str = ""
    hook_point: str = ""
    task: str = ""
    stage: str = ""
    metrics: dict = field(default_factory=dict)  # scalar metrics, e.g. "val/accuracy"
    command: str = ""  # the command that reproduces it
    size_bytes: int = 0

    def __post_init__(self):
        for name in self.sha256:
            _check_part(name, "file name")
        if not self.location.startswith("hf:"):
            for part in self.location.split("/"):
                _check_part(part, "location")


class Registry:
    """A registry file: ``{"version": 1, "checkpoints": {id: RegistryEntry}}`` next to the checkpoint folders.

    ``base`` is the folder or URL holding ``registry.json``."""

    def __init__(self, base: str | Path, entries: dict[str, RegistryEntry]):
        self.base, self.entries = base, entries

    @classmethod
    def open(cls, hub: str | Path | None = None) -> "Registry":
        """The registry of a hub folder, registry file or http(s) base URL (default: the bundled one)."""
        if hub is None:
            path = bundled_registry()
        elif _is_url(str(hub)):
            base = str(hub).rstrip("/")
            return cls(base, _parse_registry(_fetch_registry(base), base))
        else:
            path = Path(hub)
            path = path / REGISTRY_FILE if path.is_dir() or not path.suffix else path
        if not path.exists():
            if hub is None:
                return cls(path.parent, {})
            raise CheckpointError(f"no registry at {path}: pass a hub folder with {REGISTRY_FILE} or an http(s) URL")
        return cls(path.parent, _parse_registry(path.read_bytes(), str(path)))

    def __contains__(self, ref: str) -> bool:
        return ref in self.entries

    def entry(self, ref: str) -> RegistryEntry:
        check_id(ref)
        if ref not in self.entries:
            known = ", ".join(sorted(self.entries)[:8]) or "none"
            raise CheckpointError(f"{ref!r} is not in the registry at {self.base} (known: {known}): "
                                  f"run `headprobe hub list` to see what is there")
        return self.entries[ref]

    def fetch(self, ref: str) -> Path:
        """A local folder holding the checkpoint ``ref``, every file verified against the registry."""
        entry = self.entry(ref)
        if entry.location.startswith("hf:"):
            folder = _hf_snapshot(entry.location[3:] + (f"@{entry.revision}" if entry.revision else ""))
        elif isinstance(self.base, str) and _is_url(self.base):
            folder = _download(f"{self.base}/{entry.location}", entry.sha256,
                               _hub_cache(self.base) / ref / entry.sha256.get("model.safetensors", "x")[:16])
        else:
            folder = Path(self.base) / entry.location
        for name, digest in entry.sha256.items():
            if not (folder / name).is_file() or sha256(folder / name) != digest:
                raise CheckpointError(f"{folder / name} does not match the sha256 in the registry at {self.base} "
                                      f"(tampered, truncated or partly downloaded): delete it and fetch it again")
        return folder


def _is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


def _parse_registry(raw: bytes, where: str) -> dict[str, RegistryEntry]:
    try:
        data = json.loads(raw)
        known = {f.name for f in fields(RegistryEntry)}
        entries = {check_id(k): RegistryEntry(**{a: b for a, b in v.items() if a in known})
                   for k, v in data["checkpoints"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{where} is not a valid headprobe registry ({type(err).__name__}: {err})") from None
    return entries


def _hub_cache(base_url: str) -> Path:
    from headprobe.extract.models import cache_dir

    return cache_dir() / "hubs" / hashlib.sha256(base_url.encode()).hexdigest()[:16]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return response.read()


def _fetch_registry(base: str) -> bytes:
    """The registry of a static hub; the cached copy when the hub cannot be reached or HF_HUB_OFFLINE is set."""
    cached = _hub_cache(base) / REGISTRY_FILE
    offline = os.environ.get("HEADPROBE_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes")
    if not offline:
        try:
            raw = _get(f"{base}/{REGISTRY_FILE}")
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".partial")
            tmp.write_bytes(raw)
            os.replace(tmp, cached)
            return raw
        except (urllib.error.URLError, OSError) as err:
            if not cached.exists():
                raise CheckpointError(f"cannot reach {base}/{REGISTRY_FILE} ({err}) and it is not cached: "
                                      f"check the URL or your connection") from None
    if not cached.exists():
        raise CheckpointError(f"offline, and {base}/{REGISTRY_FILE} is not cached: unset HF_HUB_OFFLINE / "
                              f"HEADPROBE_OFFLINE once to fetch it")
    return cached.read_bytes()


def _download(url: str, hashes: dict[str, str], dest: Path) -> Path:
    """Fetch ``url/<file>`` for each file into ``dest``, keeping only files whose sha256 matches."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in hashes.items():
        target = dest / name
        if target.is_file() and sha256(target) == digest:
            continue
        try:
            raw = _get(f"{url}/{name}")
        except (urllib.error.URLError, OSError) as err:
            raise CheckpointError(f"cannot download {url}/{name} ({err}): check the hub URL or your connection") from None
        if hashlib.sha256(raw).hexdigest() != digest:
            raise CheckpointError(f"{url}/{name} does not match the sha256 in the hub's registry (tampered, "
                                  f"truncated or changed after publishing): nothing was kept")
        tmp = target.with_name(name + ".partial")
        tmp.write_bytes(raw)
        os.replace(tmp, target)
    return dest


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verify_hf_blobs(folder: Path) -> None:
    """Check each snapshot file against the hash huggingface_hub named its blob by: the sha256 of LFS files
    (64 hex digits) or the git blob sha1 of small files (40)."""
    for path in folder.iterdir():
        if not path.is_file():
            continue
        blob = path.resolve().name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            ok = sha256(path) == blob
        elif re.fullmatch(r"[0-9a-f]{40}", blob):
            ok = _git_blob_sha1(path) == blob
        else:
            continue
        if not ok:
            raise CheckpointError(f"{path} does not match its Hugging Face blob hash (tampered or truncated): "
                                  f"delete {path.resolve()} and download it again")


def _hf_snapshot(ref: str, context: str = "") -> Path:
    """Download (or find in the huggingface_hub cache) ``org/name[/subfolder][@revision]``; a verified folder."""
    m = HF_RE.fullmatch(ref)
    if not m or ".." in (m["rev"] or ""):
        raise CheckpointError(f"invalid Hugging Face reference {ref!r}: use org/name[/subfolder][@revision]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sub = m["sub"].lstrip("/")
    prefix = f"{sub}/" if sub else ""
    try:
        snap = snapshot_download(m["repo"], revision=m["rev"], allow_patterns=[prefix + f for f in FILES])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{context}cannot fetch {ref} from the Hugging Face Hub ({type(err).__name__}: {msg}): check the"
                              f" repo id, or download it once with HF_HUB_OFFLINE unset") from None
    folder = Path(snap) / sub
    _verify_hf_blobs(folder)
    return folder


def resolve(ref: str | Path, hub: str | Path | None = None) -> tuple[Path, dict[str, str] | None]:
    """(local folder, sha256 of its files or None) for a reference; see the module docstring."""
    if hub is None and (isinstance(ref, Path) or Path(ref).is_dir()):
        return Path(ref), None
    ref = str(ref)
    if hub is None and (Path(ref).is_absolute() or ref.startswith(("./", "~"))):  # a path, not an id
        raise CheckpointError(f"{ref} does not exist: pass a checkpoint folder, a registry id release/name (see "
                              f"`headprobe hub list`), hf:org/name or an http(s) URL")
    if _is_url(ref):
        base, _, rest = ref.rstrip("/").rpartition("/")
        base, _, release = base.rpartition("/")
        if not _is_url(base):
            raise CheckpointError(f"{ref} names no checkpoint: use http(s)://HOST/HUB/release/name")
        ref, hub = f"{release}/{rest}", base
    elif ref.startswith("hf:"):
        return _hf_snapshot(ref[3:]), None
    check_id(ref.split("@")[0])
    registry = Registry.open(hub)
    if ref in registry or hub is not None:
        entry = registry.entry(ref)
        return registry.fetch(ref), entry.sha256
    return _hf_snapshot(ref, f"{ref!r} is not in the registry at {registry.base} (see `headprobe hub list`) and "), None


def load(ref: str | Path, hub: str | Path | None = None, meta=None):
    """The probe or SAE a reference points to, verified; refused if ``meta`` (a StoreMeta) does not fit it."""
    folder, hashes = resolve(ref, hub)
    module = load_local(folder, hashes)
    if meta is not None:
        module.checkpoint_config_loaded.check_compatible(meta)
    return module


def registry_entry(folder: Path, location: str, revision: str = "", command: str = "") -> RegistryEntry:
    """The registry entry describing the checkpoint in ``folder``."""
    config, _, metrics = read_checkpoint(folder)
    hashes = file_hashes(folder)
    return RegistryEntry(location=location, sha256=hashes, revision=revision, cls=config.cls,
                         model_id=config.model_id, weights_hash=config.weights_hash, hook_point=config.hook_point,
                         task=config.task, stage=config.stage, metrics=scalar_metrics(metrics),
                         command=command or config.command,
                         size_bytes=sum((folder / n).stat().st_size for n in hashes))


def write_registry(path: Path, entries: dict[str, RegistryEntry]) -> None:
    """Atomically (re)write a registry file, ids sorted."""
    data = {"version": REGISTRY_VERSION, "checkpoints": {k: asdict(entries[k]) for k in sorted(entries)}}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def push_to_folder(folder: str | Path, hub_dir: str | Path, ref: str, revision: str = "", command: str = "",
                   overwrite: bool = False) -> Path:
    """Copy a checkpoint into ``hub_dir/<release>/<name>`` and record it (with sha256s) in the hub's registry; an id
    the registry already holds is replaced only with ``overwrite``."""
    folder, hub_dir = Path(folder), Path(hub_dir)
    read_checkpoint(folder)  # refuse anything that is not a valid checkpoint
    if hub_dir.exists() and not hub_dir.is_dir():
        raise CheckpointError(f"{hub_dir} is a file, not a hub folder: pass a folder (it is created if missing) or "
                              f"hf:org/name")
    dest = hub_dir / check_id(ref)
    registry = Registry.open(hub_dir) if (hub_dir / REGISTRY_FILE).exists() else Registry(hub_dir, {})
    if ref in registry.entries and not overwrite:
        raise CheckpointError(f"{hub_dir} already holds {ref}: pass --overwrite to replace it, or another --id")
    if dest.resolve() != folder.resolve():
        dest.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest / name)
    registry.entries[ref] = registry_entry(dest, ref, revision, command)
    write_registry(hub_dir / REGISTRY_FILE, registry.entries)
    return dest


def push_to_hf(folder: str | Path, target: str, private: bool = False, message: str = "") -> str:
    """Upload a checkpoint folder to ``org/name[/subfolder]`` on the Hugging Face Hub; returns the commit URL."""
    m = HF_RE.fullmatch(target)
    if not m or m["rev"]:
        raise CheckpointError(f"invalid Hugging Face target {target!r}: use hf:org/name[/subfolder]")
    folder = Path(folder)
    config, _, _ = read_checkpoint(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(m["repo"], private=private, exist_ok=True)
    info = api.upload_folder(repo_id=m["repo"], folder_path=folder, path_in_repo=m["sub"].lstrip("/") or None,
                             allow_patterns=list(FILES),
                             commit_message=message or f"headprobe: {config.cls} on {config.model_id} ({config.task})")
    return str(getattr(info, "commit_url", info))
