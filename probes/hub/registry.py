"""Find, fetch, verify and publish checkpoints: ``headprobe.load(ref)``.

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

A registry is untrusted input. Every field of every entry is validated before anything touches the file system
(digests are 64 lowercase hex digits, file names come from the checkpoint format's fixed set, ids and locations
are made of safe path parts), cache paths are built only from validated values and must resolve inside the cache.
Static-hub downloads stream into a temporary folder inside the hub's cache folder and are moved into place only
when every file's sha256 matches; they are bounded by the entry's ``size_bytes`` and by
``$HEADPROBE_MAX_DOWNLOAD_MB`` (default 2048; also caps registry.json, at most 16 MiB), by
``$HEADPROBE_HUB_TIMEOUT`` seconds per file (default 1800; a connection silent for 30 s is dropped sooner), and
follow redirects only within the same scheme, host and port.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from headprobe.extract.shipped import shipped_folder
from headprobe.probes.checkpoint import (FILES, CheckpointError, file_hashes, load_local, read_checkpoint,
                                         scalar_metrics, sha256)
from headprobe.probes.hub.download import NetworkError, download, get, max_bytes, show, write_atomic

REGISTRY_FILE = "registry.json"
REGISTRY_VERSION = 1
PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # one path component: no '..', no '/', no leading dot
ID_RE = re.compile(rf"{PART}/{PART}")
HF_RE = re.compile(rf"(?P<repo>{PART}/{PART})(?P<sub>(?:/{PART})*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # no control characters (terminal escapes) in one-line fields
COMMAND_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # a command may hold tabs and newlines
TEXT_FIELDS = ("revision", "cls", "model_id", "weights_hash", "hook_point", "task", "stage", "command")
MAX_TEXT = 4096
REQUIRED_FILES = ("model.safetensors", "config.json")
REGISTRY_MAX_BYTES = 16 << 20  # the most a static hub's registry.json may be


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


def _safe_location(location: object) -> bool:
    """A folder relative to the registry made of safe parts, or ``hf:org/name[/subfolder]`` without a revision."""
    if not isinstance(location, str):
        return False
    if location.startswith("hf:"):
        m = HF_RE.fullmatch(location[3:])
        return bool(m) and m["rev"] is None
    return all(re.fullmatch(PART, part) for part in location.split("/"))


def _text_problem(values: dict) -> str:
    for key in TEXT_FIELDS:
        value = values.get(key, "")
        control = COMMAND_CONTROL_RE if key == "command" else CONTROL_RE
        if not isinstance(value, str) or len(value) > MAX_TEXT or control.search(value):
            return f"an unsafe {key} {show(value)} (want text without control characters)"
    if ".." in values.get("revision", ""):
        return f"an unsafe revision {show(values['revision'])} (want no '..')"
    return ""


def _entry_problem(values: dict) -> str:
    """'' for a safe registry entry (field name -> value, as read from JSON), else what is wrong with it."""
    if not _safe_location(values.get("location")):
        return (f"an unsafe location {show(values.get('location'))} (want release/name parts of letters, digits, "
                f"'.', '_', '-', or hf:org/name[/subfolder])")
    hashes = values.get("sha256")
    if not isinstance(hashes, dict) or not set(REQUIRED_FILES) <= set(hashes):
        return f"an unsafe sha256 {show(hashes)} (want a table of file name -> sha256 with {', '.join(REQUIRED_FILES)})"
    for name, digest in hashes.items():
        if name not in FILES:
            return f"an unsafe file name {show(name)} (want one of {', '.join(FILES)})"
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            return f"an unsafe sha256 for {name}: {show(digest)} (want 64 lowercase hex digits)"
    metrics, size = values.get("metrics", {}), values.get("size_bytes", 0)
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and not CONTROL_RE.search(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in metrics.items()):
        return f"unsafe metrics {show(metrics)} (want a table of metric name -> number)"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"an unsafe size_bytes {show(size)} (want a whole number of bytes)"
    return _text_problem(values)


@dataclass
class RegistryEntry:
    """One checkpoint in a registry file; every field is validated (see :func:`_entry_problem`)."""

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
    size_bytes: int = 0  # of all its files together

    def __post_init__(self):
        problem = _entry_problem(vars(self))
        if problem:
            raise CheckpointError(f"registry entry has {problem}: the registry is corrupt or hostile")


class Registry:
    """A registry file: ``{"version": 1, "checkpoints": {id: RegistryEntry}}`` next to the checkpoint folders.

    ``base`` is the folder or URL holding ``registry.json``."""

    def __init__(self, base: str | Path, entries: dict[str, RegistryEntry]):
        self.base, self.entries = base, entries

    @classmethod
    def open(cls, hub: str | Path | None = None) -> Registry:
        """The registry of a hub folder, registry file or http(s) base URL (default: the bundled one)."""
        if hub is None:
            path = bundled_registry()
        elif _is_url(str(hub)):
            base = str(hub).rstrip("/")
            return cls(base, _fetch_registry(base))
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
            dest = _cache_path(self.base, *ref.split("/"), entry.sha256["model.safetensors"][:16])
            folder = download(f"{self.base}/{entry.location}", entry.sha256, entry.size_bytes, dest,
                              _cache_path(self.base))
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
    """The validated entries of a registry file's bytes; a one-line error naming ``where`` and the bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, numbers too long, nesting too deep
        raise CheckpointError(f"{where} is not a valid headprobe registry ({type(err).__name__}: "
                              f"{show(str(err))}): fix or re-publish it") from None
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), dict):
        raise CheckpointError(f"{where} is not a valid headprobe registry (want an object with a \"checkpoints\" "
                              f"object): fix or re-publish it")
    version = data.get("version", REGISTRY_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > REGISTRY_VERSION:
        raise CheckpointError(f"{where} has registry version {show(version)}; this headprobe reads version "
                              f"{REGISTRY_VERSION}: upgrade headprobe")
    return {ref: _parse_entry(ref, value, where) for ref, value in data["checkpoints"].items()}


def _parse_entry(ref: str, value: object, where: str) -> RegistryEntry:
    if not ID_RE.fullmatch(ref):
        raise CheckpointError(f"{where} holds an invalid checkpoint id {show(ref)}: the registry is corrupt or "
                              f"hostile (ids are 'release/name' of letters, digits, '.', '_', '-')")
    known = {f.name for f in fields(RegistryEntry)}
    problem = _entry_problem(value) if isinstance(value, dict) else "no fields (want an object)"
    if problem:
        raise CheckpointError(f"{where}: entry {ref!r} has {problem}: the registry is corrupt or hostile; "
                              f"nothing was fetched")
    return RegistryEntry(**{k: v for k, v in value.items() if k in known})


def _hub_cache(base_url: str) -> Path:
    from headprobe.extract.models import cache_dir

    return cache_dir() / "hubs" / hashlib.sha256(base_url.encode()).hexdigest()[:16]


def _cache_path(base_url: str, *parts: str) -> Path:
    """``parts`` (validated values) below the hub's cache folder; refused if the result resolves outside it."""
    root = _hub_cache(base_url)
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{path} would lie outside the hub cache {root}: the registry is hostile; nothing "
                              f"was fetched")
    return path


def _offline() -> bool:
    return os.environ.get("HEADPROBE_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes")


def _fetch_registry(base: str) -> dict[str, RegistryEntry]:
    """The validated registry of a static hub, cached once valid; the cached copy when the hub cannot be reached or
    HEADPROBE_OFFLINE / HF_HUB_OFFLINE is set."""
    url, cached = f"{base}/{REGISTRY_FILE}", _cache_path(base, REGISTRY_FILE)
    if not _offline():
        cap, why = max_bytes()
        if cap > REGISTRY_MAX_BYTES:
            cap, why = REGISTRY_MAX_BYTES, "the most a registry may be"
        try:
            raw = get(url, cap, why)
        except NetworkError:
            if not cached.exists():
                raise
        else:
            entries = _parse_registry(raw, url)  # validated before it is cached
            write_atomic(cached, raw)
            return entries
    if not cached.exists():
        raise CheckpointError(f"offline, and {url} is not cached: unset HF_HUB_OFFLINE / HEADPROBE_OFFLINE once to "
                              f"fetch it")
    return _parse_registry(cached.read_bytes(), str(cached))


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
        raise CheckpointError(f"{context}cannot fetch {ref} from the Hugging Face Hub ({type(err).__name__}: {msg}): "
                              f"check the repo id, or download it once with HF_HUB_OFFLINE unset") from None
    folder = Path(snap) / sub
    _verify_hf_blobs(folder)
    return folder


def resolve(ref: str | Path, hub: str | Path | None = None) -> tuple[Path, dict[str, str] | None]:
    """(local folder, sha256 of its files or None) for a reference; see the module docstring."""
    if isinstance(ref, str) and ref.startswith("~"):
        ref = str(Path(ref).expanduser())
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


class FromPretrained:
    """Mixin of the checkpoint classes: ``Cls.from_pretrained(ref, hub=None, meta=None)`` loads ``ref`` (a folder,
    registry id, Hugging Face repo or static hub URL, see :func:`load`) and refuses a checkpoint of another class."""

    @classmethod
    def from_pretrained(cls, ref: str | Path, hub: str | Path | None = None, meta=None):
        module = load(ref, hub, meta)
        if not isinstance(module, cls):
            raise CheckpointError(f"{ref} holds a {type(module).__name__}, not a {cls.__name__}: "
                                  f"load it with headprobe.load or {type(module).__name__}.from_pretrained")
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
