"""A full disk during `headprobe extract`: the store's size is estimated, and refused in one line, before the model's
weights load; a disk that fills during the run ends in one line that names the folder, with a `.partial` that
`--resume` finishes, byte for byte the store of an uninterrupted run, once space is free. Simulated (HDF5's write or
the progress record failing with ENOSPC) always; on a real, small tmpfs where this machine lets the test mount one.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import h5py
import pytest
import torch

from headprobe.extract import ExtractConfig, Store, extract
from headprobe.extract.models import ModelSource, load_model
from headprobe.extract.store import store_bytes
from headprobe.extract.tasks import get_task
from headprobe.train.cli import main
from helpers import assert_same_store, cli_process, run_cli_split, save_model_folder

ARGS = ["--task", "capitals", "--positions", "all", "--writes", "--block-examples", "2", "--batch-tokens", "32",
        "--no-progress"]
CONFIG = ExtractConfig(positions="all", writes=True, block_examples=2, batch_tokens=32)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(model_folder, tmp_path_factory) -> Path:
    """The store of an uninterrupted run with ARGS' settings, on one thread as the runs it is compared with."""
    out = tmp_path_factory.mktemp("reference") / "reference.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the per-test one_thread
    try:
        return extract(load_model(model_folder), get_task("capitals"), out, CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)


def _estimate(path: Path) -> int:
    with Store(path) as s:
        m = s.meta
        return store_bytes(m.n_rows, len(m.layers), m.n_heads, m.d_head, 2, m.d_model if m.has_writes else 0)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("headprobe: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err[-3000:]
    return errors[0]


def _never_load(monkeypatch) -> None:
    def fail(self, *args, **kwargs):
        raise AssertionError("the model's weights loaded")
    monkeypatch.setattr(ModelSource, "load", fail)


def test_the_estimate_is_a_close_lower_bound_of_the_file(reference):
    need, size = _estimate(reference), reference.stat().st_size
    assert need <= size <= 1.05 * need + 200_000, (need, size)


def test_a_store_that_does_not_fit_is_refused_before_the_model_loads(tmp_path, model_folder, monkeypatch, capsys):
    import headprobe.extract.store as store

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 300_000, 300_000))
    _never_load(monkeypatch)
    with pytest.raises(SystemExit) as done:
        main(["extract", "--model", model_folder, "--out", str(tmp_path / "run" / "x.h5"), *ARGS])
    line = _one_error_line(capsys.readouterr().err)
    assert done.value.code == 2
    assert line.startswith(f"headprobe: error: {tmp_path}: the store needs about 1") and "300.0 KB is free" in line
    assert "--layers" in line and list(tmp_path.iterdir()) == []


def _enospc_in_hdf5(monkeypatch, after: int) -> None:
    """HDF5's data writes fail with ENOSPC from the ``after``-th on, as h5py reports a full disk."""
    real, calls = h5py.Dataset.__setitem__, []

    def setitem(self, key, value):
        calls.append(1)
        if len(calls) >= after:
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, error "
                                        "message = 'No space left on device')")
        return real(self, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)


def _enospc_in_progress(monkeypatch, after: int) -> None:
    """The progress record's writes fail with ENOSPC from the ``after``-th on."""
    real, calls = Path.write_text, []

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".partial.tmp"):
            calls.append(1)
            if len(calls) >= after:
                with open(self, "w") as f:  # as a real full disk: the file is made, its bytes are not
                    f.write("")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("fail", [_enospc_in_hdf5, _enospc_in_progress], ids=["hdf5-write", "progress-record"])
def test_simulated_full_disk_then_resume_gives_the_uninterrupted_store(fail, tmp_path, model_folder, reference,
                                                                       monkeypatch, capsys):
    out = tmp_path / "run.h5"
    argv = ["extract", "--model", model_folder, "--out", str(out), *ARGS]
    with monkeypatch.context() as m:
        fail(m, after=40)
        with pytest.raises(SystemExit) as done:
            main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert done.value.code == 2
    rows = json.loads((tmp_path / "run.h5.partial.json").read_text())["rows_done"]
    assert line == (f"headprobe: error: {tmp_path}: no space left on the device while writing run.h5.partial ({rows} "
                    f"of {Store(reference).meta.n_rows} rows kept): free some space, then run the same command with "
                    f"--resume to finish it")
    assert rows > 0 and not out.exists() and (tmp_path / "run.h5.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5.partial", "run.h5.partial.json"]
    main([*argv, "--resume"])
    assert_same_store(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


@pytest.fixture
def tmpfs(tmp_path, reference):
    """A tmpfs twice the reference store's size, mounted for the test (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kb = 2 * reference.stat().st_size // 1024
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): the simulated tests cover it")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    try:
        while True:
            os.write(fd, bytes(512))
    except OSError:
        pass
    os.close(fd)


def _rows_done(progress: Path) -> int:
    try:
        return json.loads(progress.read_text())["rows_done"]
    except (FileNotFoundError, ValueError):
        return -1


def test_a_real_disk_filling_up_mid_run(tmpfs, tmp_path, model_folder, reference):
    out, partial, progress = tmpfs / "run.h5", tmpfs / "run.h5.partial", tmpfs / "run.h5.partial.json"
    argv = ["extract", "--model", model_folder, "--out", str(out), *ARGS]
    proc = cli_process(argv, tmp_path / "log", err_log=tmp_path / "err")
    deadline = time.monotonic() + 120
    while proc.is_alive() and _rows_done(progress) <= 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.is_alive(), (tmp_path / "err").read_text()
    _fill(tmpfs / "filler")  # another program fills the disk while the extraction runs
    proc.join(120)
    err = (tmp_path / "err").read_text()
    assert proc.exitcode == 2, (proc.exitcode, err[-3000:])  # not -11: no segfault
    line = _one_error_line(err)
    assert line.startswith(f"headprobe: error: {tmpfs}: no space left on the device while writing run.h5.partial")
    assert line.endswith("free some space, then run the same command with --resume to finish it")
    assert partial.exists() and not out.exists() and _rows_done(progress) > 0

    code, _, err = run_cli_split([*argv, "--resume"], tmp_path / "log")  # still full: refused before the model loads
    assert code == 2 and f"{tmpfs}: the store needs about" in _one_error_line(err)

    (tmpfs / "filler").unlink()
    code, _, err = run_cli_split([*argv, "--resume"], tmp_path / "log")
    assert code == 0, err[-3000:]
    assert_same_store(out, reference)
    assert sorted(p.name for p in tmpfs.iterdir()) == ["run.h5"]


CREATE_ON_A_FULL_DISK = """
import sys
from pathlib import Path
import numpy as np
from helpers import store_meta
from headprobe.extract.store import DiskFullError, StoreWriter
meta = store_meta(n_rows=4000, n_examples=4000, layers=[0, 1], n_heads=4, d_head=8, dtype="float32")
try:
    StoreWriter(Path(sys.argv[1]), meta, np.int64, resume=False)
except DiskFullError as err:
    print("refused:", err)
"""


def test_a_full_disk_while_the_partial_is_created(tmpfs, tmp_path):
    """Creation fails inside HDF5, which then cannot close the file: still one error, no partial left, nothing on
    stderr and no crash at exit (a child process, so that a segfault would show)."""
    _fill(tmpfs / "filler")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", CREATE_ON_A_FULL_DISK, str(tmpfs / "x.h5")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-3000:]
    assert res.stdout.strip() == (f"refused: {tmpfs}: no space left on the device for x.h5.partial: free some "
                                  f"space, then run the command again")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]
