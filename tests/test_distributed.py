"""Extraction across ranks: shards joined by virtual datasets read exactly as a one-process extraction."""
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from headprobe.extract import ExtractConfig, Store, StoreError, extract, load_model
from headprobe.extract.distributed import extract_share, join_shards, shard_path, shares
from headprobe.extract.store import StoreWriter
from headprobe.extract.tasks import get_task
from helpers import save_tiny_llama, torchrun

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("token_id", "example_id", "position", "label", "group", "split")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")




def assert_same_store(a: Path, b: Path) -> None:
    with Store(a) as sa, Store(b) as sb:
        assert sa.shape == sb.shape
        np.testing.assert_array_equal(sa.activations(), sb.activations())
        for name in COLUMNS:
            np.testing.assert_array_equal(sa.column(name), sb.column(name), err_msg=name)
        if sa.meta.has_writes:
            np.testing.assert_array_equal(sa.activations(name="write"), sb.activations(name="write"))
            np.testing.assert_array_equal(sa.file["out_bias"][()], sb.file["out_bias"][()])
        ma, mb = asdict(sa.meta), asdict(sb.meta)
        ma.pop("created"), mb.pop("created")
        assert ma == mb


def test_shares_are_disjoint_balanced_blocks():
    for n, world, block in [(160, 2, 40), (1000, 3, 256), (10, 4, 256), (3, 5, 8), (257, 2, 256)]:
        ranges = shares(n, world, block)
        assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint, covering
        sizes = [hi - lo for lo, hi in ranges]
        if -(-n // block) >= world:  # enough blocks: shares start on block boundaries
            assert all(lo % block == 0 for lo, _ in ranges)
        assert max(sizes) - min(sizes) <= max(block, -(-n // world))
    assert shares(160, 2, 40) == [(0, 80), (80, 160)]


def test_joined_shards_equal_one_process(tmp_path, tiny_folder):
    loaded, task = load_model(str(tiny_folder)), get_task("capitals")
    cfg = ExtractConfig(block_examples=32, max_examples=150, writes=True)
    ref = extract(loaded, task, tmp_path / "ref.h5", cfg, progress=False)
    for rank in range(3):
        extract_share(loaded, task, tmp_path / "d.h5", cfg, rank, 3, progress=False)
    master = join_shards(tmp_path / "d.h5", task, cfg, 3)
    assert_same_store(ref, master)
    with Store(master) as s:
        assert s.file["z"].is_virtual and s.meta.n_examples == 150
        assert len(s.rows("train")) + len(s.rows("val")) + len(s.rows("test")) == len(s)

    # the master only points at the shards: moved together (relative paths) it still reads
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in tmp_path.glob("d.*h5"):
        p.rename(moved / p.name)
    assert_same_store(ref, moved / "d.h5")
    # joining with a shard missing says which one and what to do
    (moved / shard_path("d.h5", 1, 3).name).unlink()
    with pytest.raises(StoreError, match="shard-00001-of-00003.h5 is missing"):  # not NaN rows read silently
        Store(moved / "d.h5")
    with pytest.raises(StoreError, match="shard-00001-of-00003.*relaunch"):
        join_shards(moved / "d.h5", task, cfg, 3, overwrite=True)


def test_interrupted_rank_resumes(tmp_path, tiny_folder, monkeypatch):
    loaded, task = load_model(str(tiny_folder)), get_task("capitals")
    cfg = ExtractConfig(block_examples=20, max_examples=120)
    ref = extract(loaded, task, tmp_path / "ref.h5", cfg, progress=False)
    extract_share(loaded, task, tmp_path / "d.h5", cfg, 0, 2, progress=False)

    written = []
    real_write = StoreWriter.write_block

    def crash_after_one_block(self, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(1)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_block", crash_after_one_block)
    with pytest.raises(KeyboardInterrupt):
        extract_share(loaded, task, tmp_path / "d.h5", cfg, 1, 2, progress=False)
    monkeypatch.setattr(StoreWriter, "write_block", real_write)
    with pytest.raises(StoreError, match="relaunch with --resume"):
        join_shards(tmp_path / "d.h5", task, cfg, 2)

    calls = []
    counting = lambda self, *a, **k: calls.append(1) or real_write(self, *a, **k)
    monkeypatch.setattr(StoreWriter, "write_block", counting)
    extract_share(loaded, task, tmp_path / "d.h5", cfg, 1, 2, resume=True, progress=False)
    extract_share(loaded, task, tmp_path / "d.h5", cfg, 0, 2, resume=True, progress=False)  # done: no work
    assert len(calls) == 2  # rank 1 continued with its 2 remaining blocks of 20 (60 examples, 1 was committed)
    assert_same_store(ref, join_shards(tmp_path / "d.h5", task, cfg, 2))


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, tiny_folder):
    """The real launcher: 2 CPU processes under torchrun (gloo), joined by rank 0."""
    loaded, task = load_model(str(tiny_folder)), get_task("capitals")
    cfg = ExtractConfig(block_examples=40)
    ref = extract(loaded, task, tmp_path / "ref.h5", cfg, progress=False)
    out = tmp_path / "dist.h5"
    rc, stdout, stderr = torchrun(2, "-m", "headprobe.extract.distributed_cli", "--model", str(tiny_folder),
                                  "--task", "capitals", "--out", str(out), "--block-examples", "40", "--no-progress")
    assert rc == 0, stderr[-3000:]
    assert "from 2 shard(s)" in stdout
    assert shard_path(out, 0, 2).exists() and shard_path(out, 1, 2).exists()
    assert_same_store(ref, out)


def test_device_map_load_captures_every_head(tmp_path, tiny_folder):
    """load_model(device_map=...) goes through accelerate's placement; the hooks still see every head (on one CPU
    here: bench/gpu_check.py checks a model split between GPU and CPU)."""
    task, cfg = get_task("capitals"), ExtractConfig(max_examples=40, writes=True)
    plain = extract(load_model(str(tiny_folder)), task, tmp_path / "plain.h5", cfg, progress=False)
    mapped = load_model(str(tiny_folder), device_map="auto")
    assert next(mapped.model.parameters()).device.type == "cpu"
    assert_same_store(plain, extract(mapped, task, tmp_path / "mapped.h5", cfg, progress=False))
