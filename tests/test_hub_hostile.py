"""A hostile static hub, served by the test itself on 127.0.0.1: registries and responses that try to write outside
the cache (absolute and ``..`` digests, locations, file names and ids), send too much, lie about their length,
redirect to another host or never finish. Each is refused with a one-line CheckpointError that names the problem,
and a walk of the temporary root afterwards finds nothing outside the cache folder, and inside it nothing but a
valid registry.json (no partial download, no unverified file)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from headprobe import probes
from headprobe.probes.checkpoint import CheckpointError
from headprobe.probes.hub import Registry, push_to_folder
from helpers import make_checkpoint

FILE = "/hub/v0/scorer/model.safetensors"


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path]``: bytes (200 with an honest Content-Length) or a callable(handler)."""

    def do_GET(self):
        route = self.server.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            elif callable(route):
                route(self)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(route)))
                self.end_headers()
                self.wfile.write(route)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1"):
        super().__init__((host, 0), Handler)
        self.routes: dict[str, object] = {}
        self.stop = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


def _other_host() -> Server:
    """A second server on another host (127.0.0.2) where the loopback network allows it, else another port."""
    try:
        return Server("127.0.0.2")
    except OSError:
        return Server("127.0.0.1")


# --- hostile responses ------------------------------------------------------------------------------------------
def redirect(location: str) -> Callable:
    def route(h):
        h.send_response(301)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def with_length(body: bytes, declared: int | None) -> Callable:
    """200 with ``declared`` as Content-Length (None: no header, the body ends when the connection closes)."""
    def route(h):
        h.send_response(200)
        if declared is not None:
            h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(body)
    return route


def endless(block: int = 1 << 16, most: int = 16 << 20) -> Callable:
    """200 without Content-Length, then zeros until the client hangs up (or ``most`` bytes)."""
    def route(h):
        h.send_response(200)
        h.end_headers()
        for _ in range(most // block):
            h.wfile.write(bytes(block))
    return route


def stall(head: bytes, declared: int) -> Callable:
    """Headers and a few bytes, then nothing (until the test ends, at most 60 s)."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
        h.server.stop.wait(60)
    return route


def drip(body: bytes, every_s: float = 0.05, most_s: float = 20) -> Callable:
    """A file that never finishes: ``body`` (with its honest length), one byte every ``every_s`` seconds, never
    silent long enough to time out (the server gives up after ``most_s``)."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        end = time.monotonic() + most_s
        for i in range(len(body)):
            if time.monotonic() > end or h.server.stop.wait(every_s):
                break
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
    return route


# --- the hub and its cases --------------------------------------------------------------------------------------
@dataclass
class Hub:
    root: Path  # the temporary root that is walked afterwards
    server: Server
    other: Server  # another host
    entry: dict  # the honest registry entry of v0/scorer
    files: dict[str, bytes]  # its files

    def registry(self, entries: dict | None = None, **changes) -> bytes:
        entries = entries if entries is not None else {"v0/scorer": {**self.entry, **changes}}
        return json.dumps({"version": 1, "checkpoints": entries}).encode()

    def serve(self, server: Server | None = None, **routes) -> None:
        """Serve the honest hub on ``server``, with ``routes`` (path -> response) replaced."""
        server = server or self.server
        server.routes.update({"/hub/registry.json": self.registry()})
        server.routes.update({f"/hub/v0/scorer/{name}": data for name, data in self.files.items()})
        server.routes.update(routes)

    @property
    def ref(self) -> str:
        return f"{self.server.url}/hub/v0/scorer"


@dataclass
class Case:
    id: str
    setup: Callable[[Hub], str | None]  # serves the hostile hub; returns the reference to load (default hub.ref)
    says: str  # regex the one-line error must match
    env: dict[str, str] = field(default_factory=dict)


def _hashes(hub: Hub, **extra) -> dict:
    """The honest sha256 table with ``extra`` entries added; config.json first, so that a hostile digest for
    model.safetensors comes after a file that downloads and verifies."""
    table = {"config.json": hub.entry["sha256"]["config.json"], **extra}
    return {**table, **{k: v for k, v in hub.entry["sha256"].items() if k not in table}}


def registry(make: Callable[[Hub], bytes]) -> Callable[[Hub], None]:
    """Serve the honest hub with the registry.json that ``make(hub)`` writes."""
    return lambda hub: hub.serve(**{"/hub/registry.json": make(hub)})


def entry(**changes) -> Callable[[Hub], None]:
    """Serve the honest hub with these fields of the v0/scorer entry changed."""
    return registry(lambda hub: hub.registry(**changes))


def model_file(make: Callable[[Hub], object]) -> Callable[[Hub], None]:
    """Serve the honest hub with model.safetensors answered by ``make(hub)`` (bytes or a response)."""
    return lambda hub: hub.serve(**{FILE: make(hub)})


def _digest(make: Callable[[Hub], object]) -> Callable[[Hub], None]:
    return registry(lambda hub: hub.registry(sha256=_hashes(hub, **{"model.safetensors": make(hub)})))


def _evil_file(hub: Hub) -> None:
    evil = b"import os; os.system('echo owned')\n"
    hashes = _hashes(hub, **{"evil.py": hashlib.sha256(evil).hexdigest()})
    hub.serve(**{"/hub/registry.json": hub.registry(sha256=hashes, size_bytes=hub.entry["size_bytes"] + len(evil)),
                 "/hub/v0/scorer/evil.py": evil})


def _redirect(path: str) -> Callable[[Hub], None]:
    """The other host serves the honest hub, and this one redirects ``path`` there."""
    def setup(hub: Hub) -> None:
        hub.serve(hub.other)
        hub.serve(**{path: redirect(f"{hub.other.url}{path}")})
    return setup


def _real(hub: Hub) -> bytes:
    return hub.files["model.safetensors"]


CAP_1MB, TIMEOUT = {"HEADPROBE_MAX_DOWNLOAD_MB": "1"}, {"HEADPROBE_HUB_TIMEOUT": "0.5"}
DECLARED = r"model\.safetensors is bigger than \d+ bytes \(what is left of the \d+ bytes the registry declares"
DIGEST = r"unsafe sha256 for model\.safetensors: .* \(want 64 lowercase hex digits\)"
CASES = [
    # digests that would become the download folder
    Case("absolute-digest", _digest(lambda hub: f"{hub.root}/pwned-by-an-absolute-digest".ljust(64, "x")), DIGEST),
    Case("dotdot-digest", _digest(lambda hub: "../../../../../x".ljust(64, "y")), DIGEST),
    Case("short-digest", _digest(lambda hub: "abc"), DIGEST),
    Case("uppercase-digest", _digest(lambda hub: hub.entry["sha256"]["model.safetensors"].upper()), DIGEST),
    Case("digest-not-a-string", _digest(lambda hub: 12345), DIGEST),
    # file names
    Case("file-name-dotdot", registry(lambda hub: hub.registry(sha256=_hashes(hub, **{"../x": "0" * 64}))),
         r"unsafe file name '\.\./x' \(want one of model\.safetensors, config\.json"),
    Case("file-name-absolute", registry(lambda hub: hub.registry(sha256=_hashes(hub, **{f"{hub.root}/x": "0" * 64}))),
         r"unsafe file name '/tmp/"),
    Case("file-name-not-a-checkpoint-file", _evil_file, r"unsafe file name 'evil\.py' \(want one of"),
    Case("sha256-not-a-table", entry(sha256=["model.safetensors"]), r"unsafe sha256 .*want a table"),
    # locations and ids
    Case("location-dotdot", entry(location="../../x"), r"unsafe location '\.\./\.\./x'"),
    Case("location-absolute", entry(location="/etc/x"), r"unsafe location '/etc/x'"),
    Case("location-another-host", registry(lambda hub: hub.registry(location=f"{hub.other.url}/hub/v0/scorer")),
         r"unsafe location 'http://"),
    Case("location-hf-traversal", entry(location="hf:org/../x"), r"unsafe location 'hf:org/\.\./x'"),
    Case("id-traversal-in-registry", registry(lambda hub: hub.registry({"../../x": hub.entry, "v0/scorer": hub.entry})),
         r"invalid checkpoint id '\.\./\.\./x'"),
    Case("id-traversal-in-url", lambda hub: hub.serve() or f"{hub.server.url}/hub/../x",
         r"invalid checkpoint id '\.\./x'"),
    # other fields
    Case("metrics-not-numbers", entry(metrics={"val/acc": "high"}), r"unsafe metrics"),
    Case("size-not-a-number", entry(size_bytes="big"), r"unsafe size_bytes 'big'"),
    Case("control-characters", entry(cls="HeadScorer\x1b[2J"), r"unsafe cls .*control characters"),
    Case("registry-not-an-object", registry(lambda hub: b"[1, 2]"),
         r"registry\.json is not a valid headprobe registry \(want an object"),
    Case("registry-entry-not-an-object", registry(lambda hub: hub.registry({"v0/scorer": "model.safetensors"})),
         r"'v0/scorer' has no fields"),
    Case("registry-nested-too-deep", registry(lambda hub: b"[" * 100_000),
         r"registry\.json is not a valid headprobe registry"),
    # sizes
    Case("body-bigger-than-declared", model_file(lambda hub: _real(hub) + bytes(4 << 20)), DECLARED),
    Case("endless-body-over-the-cap", lambda hub: hub.serve(**{"/hub/registry.json": hub.registry(size_bytes=0),
                                                              FILE: endless()}),
         r"model\.safetensors is bigger than 1000000 bytes \(HEADPROBE_MAX_DOWNLOAD_MB=1\)", CAP_1MB),
    Case("declared-size-over-the-cap", entry(size_bytes=5_000_000),
         r"declares 5\.0 MB, more than HEADPROBE_MAX_DOWNLOAD_MB=1", CAP_1MB),
    Case("huge-registry", registry(lambda hub: hub.registry({"v0/scorer": {**hub.entry, "pad": "x" * (2 << 20)}})),
         r"registry\.json is bigger than 1000000 bytes \(HEADPROBE_MAX_DOWNLOAD_MB=1\)", CAP_1MB),
    Case("content-length-too-short", model_file(lambda hub: with_length(_real(hub), len(_real(hub)) - 100)),
         r"model\.safetensors does not match the sha256 in the hub's registry"),
    Case("content-length-too-long", model_file(lambda hub: with_length(_real(hub), len(_real(hub)) + 10)),
         r"cannot download .*model\.safetensors \(the connection closed after \d+ of the \d+ bytes it announced\)"),
    Case("content-length-huge", model_file(lambda hub: with_length(_real(hub), 10 ** 12)), DECLARED),
    # redirects
    Case("redirect-file-to-another-host", _redirect(FILE), r"model\.safetensors redirects to another host"),
    Case("redirect-registry-to-another-host", _redirect("/hub/registry.json"),
         r"registry\.json redirects to another host"),
    Case("redirect-to-a-file-url", model_file(lambda hub: redirect(f"file://{hub.root}/x")),
         r"model\.safetensors .*[Rr]edirect"),
    # files that never finish
    Case("stalled-file", model_file(lambda hub: stall(_real(hub)[:10], len(_real(hub)))),
         r"model\.safetensors timed out \(no data for 0\.5 s\): raise HEADPROBE_HUB_TIMEOUT", TIMEOUT),
    Case("dripping-file", model_file(lambda hub: drip(_real(hub))),
         r"model\.safetensors timed out \(unfinished after 1 s\): raise HEADPROBE_HUB_TIMEOUT",
         {"HEADPROBE_HUB_TIMEOUT": "1"}),
    Case("stalled-registry", registry(lambda hub: stall(b'{"version"', 10_000)),
         r"registry\.json timed out \(no data for 0\.5 s\): raise HEADPROBE_HUB_TIMEOUT", TIMEOUT),
]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[dict, dict[str, bytes]]:
    """An honest checkpoint pushed to a hub folder: (its registry entry, its files)."""
    folder = tmp_path_factory.mktemp("published")
    make_checkpoint(folder / "ck")
    push_to_folder(folder / "ck", folder / "hub", "v0/scorer")
    entry = json.loads((folder / "hub" / "registry.json").read_text())["checkpoints"]["v0/scorer"]
    files = {name: (folder / "hub" / "v0" / "scorer" / name).read_bytes() for name in entry["sha256"]}
    return entry, files


@pytest.fixture
def hub(published, monkeypatch):
    """A fresh temporary root with HEADPROBE_CACHE at root/cache, and two servers; the root is short (14
    characters) so that the first 16 characters of an absolute digest name a folder inside it."""
    root = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    assert len(str(root)) == 14
    for name in ("HEADPROBE_OFFLINE", "HF_HUB_OFFLINE", "HEADPROBE_MAX_DOWNLOAD_MB", "HEADPROBE_HUB_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HEADPROBE_CACHE", str(root / "cache"))
    server, other = Server(), _other_host()
    yield Hub(root, server, other, *published)
    server.close()
    other.close()
    shutil.rmtree(root, ignore_errors=True)


def leftovers(root: Path) -> list[str]:
    """What a failed load must not leave: anything outside root/cache, and inside it anything but a valid
    registry.json (a partial download, an unverified file, a registry that was refused)."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root)
            outside = rel.parts[0] != "cache" or "partial" in name or path.is_symlink()
            if outside or (path.is_file() and name != "registry.json"):
                found.append(str(rel))
            elif path.is_file():
                try:
                    Registry.open(path)
                except CheckpointError as err:
                    found.append(f"{rel} (a refused registry was cached: {err})")
    return found


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_a_hostile_hub_is_refused_in_one_line_and_writes_nothing_outside_the_cache(case: Case, hub, monkeypatch):
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    ref = case.setup(hub) or hub.ref
    try:
        probes.load(ref)
        raised = None
    except Exception as err:  # noqa: BLE001 - whatever it raised, the walk below comes first
        raised = err
    assert leftovers(hub.root) == []
    assert isinstance(raised, CheckpointError), f"{type(raised).__name__}: {raised}"
    message = str(raised)
    assert "\n" not in message and "\r" not in message, message
    assert re.search(case.says, message), message


def test_the_honest_hub_loads_and_a_same_host_redirect_is_followed(hub):
    hub.serve(**{FILE: redirect("/elsewhere/model.safetensors"),
                 "/elsewhere/model.safetensors": hub.files["model.safetensors"]})
    module = probes.load(hub.ref)
    assert module.checkpoint_config_loaded.command == "python make.py"
    cached = sorted(p.relative_to(hub.root).as_posix() for p in hub.root.rglob("*") if p.is_file())
    digest = hub.entry["sha256"]["model.safetensors"][:16]
    assert len(cached) == 5 and cached[0].endswith("/registry.json")
    assert all(re.fullmatch(rf"cache/hubs/[0-9a-f]{{16}}/v0/scorer/{digest}/[\w.]+", p) for p in cached[1:]), cached


def test_a_hostile_registry_leaves_a_cached_checkpoint_and_registry_alone(hub):
    hub.serve()
    probes.load(hub.ref)
    before = {p: p.read_bytes() for p in hub.root.rglob("*") if p.is_file()}
    hub.serve(**{"/hub/registry.json": hub.registry(location="../../x")})
    with pytest.raises(CheckpointError, match="unsafe location"):
        probes.load(hub.ref)
    assert {p: p.read_bytes() for p in hub.root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name, value", [("HEADPROBE_MAX_DOWNLOAD_MB", "lots"), ("HEADPROBE_MAX_DOWNLOAD_MB", "-1"),
                                         ("HEADPROBE_HUB_TIMEOUT", "0"), ("HEADPROBE_HUB_TIMEOUT", "nan")])
def test_a_bad_limit_in_the_environment_is_named(hub, monkeypatch, name, value):
    hub.serve()
    monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError, match=rf"^{name}={value!r} is not a positive number") as err:
        probes.load(hub.ref)
    assert "\n" not in str(err.value) and leftovers(hub.root) == []



def test_hub_show_escapes_control_characters_from_a_hostile_checkpoint(hub, capsys):
    """Metric names in a hub's metrics.json reach the terminal: escapes in them are printed as text."""
    from headprobe.train.cli import main

    metrics = json.dumps({"val": {"acc\x1b[2J\x1b]0;owned\x07": 0.5}}).encode()
    hashes = {**hub.entry["sha256"], "metrics.json": hashlib.sha256(metrics).hexdigest()}
    size = hub.entry["size_bytes"] - len(hub.files["metrics.json"]) + len(metrics)
    hub.serve(**{"/hub/registry.json": hub.registry(sha256=hashes, size_bytes=size),
                 "/hub/v0/scorer/metrics.json": metrics})
    main(["hub", "show", hub.ref])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert r"metrics: val/acc\x1b[2J\x1b]0;owned\x07=0.5" in out
