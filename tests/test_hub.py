"""probes.load from registries, static hubs over real HTTP and the Hugging Face cache; publishing; the CLI."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from headprobe import probes
from headprobe.probes.checkpoint import CheckpointError
from headprobe.probes.hub import push_to_folder
from helpers import HeadScorer, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A static hub folder served by a real HTTP server on 127.0.0.1 (ephemeral port): (folder, base URL)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(hub)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HEADPROBE_OFFLINE", raising=False)
    return tmp_path / "cache"


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    z = torch.randn(4, 3, 6, 8)
    return torch.equal(a(z), b(z))


def flip_byte(path: Path, offset: int = -1) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


def test_static_hub_over_http(tmp_path, served, cache):
    hub, url = served
    original = make_checkpoint(tmp_path / "ck")
    push_to_folder(tmp_path / "ck", hub, "v0/scorer", revision="v0", command="python make.py")
    registry = json.loads((hub / "registry.json").read_text())
    entry = registry["checkpoints"]["v0/scorer"]
    assert entry["sha256"]["model.safetensors"] == hashlib.sha256(
        (hub / "v0/scorer/model.safetensors").read_bytes()).hexdigest()
    assert entry["metrics"] == {"val/accuracy": 0.75} and entry["task"] == "capitals"

    loaded = probes.load(f"{url}/v0/scorer")
    assert isinstance(loaded, HeadScorer) and same(loaded, original)
    assert HeadScorer.from_pretrained("v0/scorer", hub=url).checkpoint_config_loaded.command == "python make.py"
    cached = list(cache.glob("hubs/*/v0/scorer/*/model.safetensors"))
    assert len(cached) == 1

    # the server changes a byte after publishing: a fresh download is refused and nothing is kept
    flip_byte(hub / "v0/scorer/model.safetensors")
    shutil.rmtree(cache)
    with pytest.raises(CheckpointError, match="does not match the sha256 in the hub's registry"):
        probes.load(f"{url}/v0/scorer")
    assert not list(cache.glob("hubs/*/v0/scorer/*/model.safetensors"))
    with pytest.raises(CheckpointError, match="not in the registry"):
        probes.load(f"{url}/v0/missing")


def test_static_hub_works_offline_from_cache(tmp_path, served, monkeypatch):
    hub, url = served
    original = make_checkpoint(tmp_path / "ck")
    push_to_folder(tmp_path / "ck", hub, "v0/scorer")
    probes.load(f"{url}/v0/scorer")
    shutil.rmtree(hub)  # the server now answers 404 for everything
    monkeypatch.setenv("HEADPROBE_OFFLINE", "1")
    assert same(probes.load(f"{url}/v0/scorer"), original)


def _hf_cache_layout(cache: Path, repo: str, folder: Path, commit: str) -> Path:
    """Lay out ``folder`` the way huggingface_hub caches a repo: blobs named by their hash (sha256 for LFS files,
    git blob sha1 otherwise), a snapshot of symlinks, and refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snap / path.name).symlink_to(Path("../../blobs") / blob)
    return root


def _load_in_fresh_process(ref: str, hf_cache: Path) -> subprocess.CompletedProcess:
    code = ("import torch, helpers\nfrom headprobe import probes\n"
            f"m = probes.load({ref!r})\n"
            "torch.manual_seed(1); z = torch.randn(4, 3, 6, 8)\n"
            "print(type(m).__name__, m.checkpoint_config_loaded.task, float(m(z).sum().detach()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache), "HF_HOME": str(hf_cache.parent)}
    return subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=120)


def test_hugging_face_cache_offline(tmp_path):
    original = make_checkpoint(tmp_path / "ck")
    hf_cache = tmp_path / "hf" / "hub"
    _hf_cache_layout(hf_cache, "someorg/head-scorer", tmp_path / "ck", "a" * 40)
    torch.manual_seed(1)
    expected = float(original(torch.randn(4, 3, 6, 8)).sum().detach())

    done = _load_in_fresh_process("someorg/head-scorer", hf_cache)
    assert done.returncode == 0, done.stderr
    name, task, value = done.stdout.split()
    assert (name, task) == ("HeadScorer", "capitals") and float(value) == pytest.approx(expected, rel=1e-6)



def test_hugging_face_cache_tampered_or_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    make_checkpoint(tmp_path / "ck")
    hf_cache = tmp_path / "hf" / "hub"
    root = _hf_cache_layout(hf_cache, "someorg/head-scorer", tmp_path / "ck", "b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))  # what HF_HUB_CACHE / HF_HUB_OFFLINE set at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    probes.load("hf:someorg/head-scorer@main")
    for blob in (root / "blobs").iterdir():  # one byte changed in any cached file is refused by its hash
        whole = blob.read_bytes()
        flip_byte(blob, len(whole) // 2)
        with pytest.raises(CheckpointError, match="does not match its Hugging Face blob hash"):
            probes.load("hf:someorg/head-scorer")
        blob.write_bytes(whole)
    with pytest.raises(CheckpointError, match="cannot fetch someorg/not-cached from the Hugging Face Hub"):
        probes.load("someorg/not-cached")


def test_registry_in_a_folder_verifies_every_file(tmp_path):
    original = make_checkpoint(tmp_path / "ck")
    hub = tmp_path / "hub"
    push_to_folder(tmp_path / "ck", hub, "v0/scorer")
    assert same(probes.load("v0/scorer", hub=hub), original)
    for name in ("config.json", "metrics.json", "README.md", "model.safetensors"):
        path = hub / "v0/scorer" / name
        whole = path.read_bytes()
        flip_byte(path, len(whole) // 2)
        with pytest.raises(CheckpointError, match=f"{name} does not match the sha256 in the registry"):
            probes.load("v0/scorer", hub=hub)
        path.write_bytes(whole[:-10])  # truncated
        with pytest.raises(CheckpointError, match=f"{name} does not match the sha256 in the registry"):
            probes.load("v0/scorer", hub=hub)
        path.write_bytes(whole)
    probes.load("v0/scorer", hub=hub)


@pytest.mark.parametrize("ref", ["../etc/passwd", "v0/../../secret", "/etc/x", "..", "v0/.hidden", "a/b/c"])
def test_path_traversal_ids_are_refused(tmp_path, served, ref):
    hub, url = served
    make_checkpoint(tmp_path / "ck")
    push_to_folder(tmp_path / "ck", hub, "v0/scorer")
    for call in (lambda: probes.load(ref, hub=hub), lambda: probes.load(ref, hub=url),
                 lambda: push_to_folder(tmp_path / "ck", hub, ref)):
        with pytest.raises(CheckpointError, match="invalid checkpoint id") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="invalid checkpoint id"):
        probes.load(f"{url}/../secret")


def test_a_hub_folder_that_is_a_file_is_refused_by_its_name(tmp_path):
    make_checkpoint(tmp_path / "ck")
    (tmp_path / "hub").write_text("mine")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'hub'} is a file, not a hub folder"):
        push_to_folder(tmp_path / "ck", tmp_path / "hub", "v0/scorer")
    assert (tmp_path / "hub").read_text() == "mine"


def test_hostile_registry_entries_are_refused(tmp_path):
    make_checkpoint(tmp_path / "ck")
    hub = tmp_path / "hub"
    push_to_folder(tmp_path / "ck", hub, "v0/scorer")
    good = json.loads((hub / "registry.json").read_text())
    entry = good["checkpoints"]["v0/scorer"]
    for bad in ({**entry, "location": "../../ck"}, {**entry, "sha256": {"../../.bashrc": "0" * 64}}):
        (hub / "registry.json").write_text(json.dumps({"version": 1, "checkpoints": {"v0/scorer": bad}}))
        with pytest.raises(CheckpointError, match="unsafe"):
            probes.load("v0/scorer", hub=hub)
    (hub / "registry.json").write_text(json.dumps({"version": 1, "checkpoints": {"../x": entry}}))
    with pytest.raises(CheckpointError, match="invalid checkpoint id"):
        probes.load("v0/scorer", hub=hub)


def test_load_refuses_incompatible_store_meta(tmp_path):
    from helpers import store_meta

    make_checkpoint(tmp_path / "ck")
    probes.load(tmp_path / "ck", meta=store_meta())
    with pytest.raises(CheckpointError, match="trained on tiny-llama .* come from gpt2"):
        probes.load(tmp_path / "ck", meta=store_meta(model_id="gpt2", weights_hash="0"))


def test_cli_push_list_show(tmp_path, capsys):
    from headprobe.train.cli import main

    make_checkpoint(tmp_path / "ck")
    hub = tmp_path / "hub"
    main(["hub", "push", str(tmp_path / "ck"), "--to", str(hub), "--id", "v0/scorer", "--command", "python make.py"])
    main(["hub", "push", str(tmp_path / "ck"), "--to", str(hub)])
    main(["hub", "list", "--hub", str(hub)])
    out = capsys.readouterr().out
    assert "2 checkpoints" in out and "v0/scorer" in out and "local/ck" in out and "val/accuracy=0.75" in out
    main(["hub", "show", "v0/scorer", "--hub", str(hub)])
    out = capsys.readouterr().out
    assert '"cls": "HeadScorer"' in out and "weight (3, 6, 8) float32" in out and "python make.py" in out
    with pytest.raises(SystemExit) as exit_:
        main(["hub", "show", "../../etc", "--hub", str(hub)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headprobe: error: invalid checkpoint id") and "\n" not in err



def test_cli_push_refuses_an_existing_id_and_names_a_run_checkpoint_by_its_run(tmp_path, capsys):
    """Every training run exports a folder named checkpoint/: the default id comes from its run folder, and a
    second push to an id the hub holds is refused unless --overwrite."""
    from headprobe.train.cli import main

    for run in ("taskA", "taskB"):
        make_checkpoint(tmp_path / run / "checkpoint")
    hub = tmp_path / "hub"
    main(["hub", "push", str(tmp_path / "taskA" / "checkpoint"), "--to", str(hub)])
    main(["hub", "push", str(tmp_path / "taskB" / "checkpoint"), "--to", str(hub)])
    assert set(json.loads((hub / "registry.json").read_text())["checkpoints"]) == {"local/taskA", "local/taskB"}
    before = (hub / "registry.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["hub", "push", str(tmp_path / "taskB" / "checkpoint"), "--to", str(hub), "--id", "local/taskA"])
    assert exit_.value.code == 2 and (hub / "registry.json").read_text() == before
    assert "already holds local/taskA: pass --overwrite" in capsys.readouterr().err
    main(["hub", "push", str(tmp_path / "taskB" / "checkpoint"), "--to", str(hub), "--id", "local/taskA",
          "--overwrite"])
    assert (hub / "local" / "taskA" / "config.json").read_bytes() == (tmp_path / "taskB" / "checkpoint" /
                                                                     "config.json").read_bytes()
