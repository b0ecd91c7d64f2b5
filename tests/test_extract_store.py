"""Item 8 of the extraction issue: schema metadata, refusal of incomplete files, fast scattered-row reads."""
from __future__ import annotations

import shutil
from datetime import datetime, timezone
from importlib.metadata import version

import h5py
import numpy as np
import pytest

from headprobe.extract import SCHEMA_VERSION, ExtractConfig, Store, StoreError, extract
from headprobe.extract.store import CHUNK_ROWS, SPLITS
from headprobe.extract.tasks import Example, Task, dataset_hash
from helpers import interrupted, tiny_loaded

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def word_task(n: int = 300) -> Task:
    """``n`` short labelled sentences in groups of three."""
    def make(seed: int) -> list[Example]:
        rng = np.random.default_rng(seed)
        return [Example(text=" ".join(rng.choice(WORDS, size=rng.integers(1, 4))), label=i % 3, group=f"g{i // 3}")
                for i in range(n)]
    return Task("words", "ICI", "toy words", ["a", "b", "c"], make)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> str:
    """A few thousand rows (every position) so reads cross many chunks."""
    out = tmp_path_factory.mktemp("store") / "all.h5"
    import torch
    torch.set_num_threads(1)
    extract(tiny_loaded("gpt2"), word_task(), out, ExtractConfig(positions="all"), progress=False)
    return str(out)


def test_metadata_describes_the_extraction(tmp_path):
    loaded = tiny_loaded("llama")
    task = word_task(40)
    cfg = ExtractConfig(layers=[2, 0], writes=True, padding_side="left")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    with Store(extract(loaded, task, tmp_path / "m.h5", cfg, progress=False)) as s:
        m = s.meta
        assert m.schema_version == SCHEMA_VERSION and s.file.attrs["complete"]
        assert (m.model_id, m.weights_hash, m.architecture) == ("tiny-llama", loaded.weights_hash, "llama")
        assert (m.n_layers, m.layers, m.n_heads, m.n_kv_heads, m.d_head, m.d_model) == (3, [0, 2], 6, 2, 8, 48)
        assert m.hook_point == "model.layers.{layer}.self_attn.o_proj:input"
        assert (m.dtype, m.position_rule, m.padding_side, m.bos) == ("float16", "last", "left", True)
        assert (m.task, m.stage, m.label_names, m.label_kind) == ("words", "ICI", ["a", "b", "c"], "class")
        assert m.dataset_hash == dataset_hash(task.examples(0))
        assert (m.n_examples, m.n_rows, m.has_writes) == (40, 40, True)
        assert m.headprobe_version == version("headprobe")
        assert before <= datetime.fromisoformat(m.created) <= datetime.now(timezone.utc)
        assert m.config["layers"] == [0, 2] and m.config["writes"] is True
        assert s.shape == (40, 2, 6, 8)
        z = s.file["z"]
        assert z.dtype == np.float16 and z.chunks == (40, 2, 6, 8) and z.compression is None
        assert s.file["write"].shape == (40, 2, 6, 48) and s.file["out_bias"].shape == (2, 48)
        np.testing.assert_array_equal(s.labels, np.arange(40) % 3)
        np.testing.assert_array_equal(s.column("example_id"), np.arange(40))
        splits = {name: set(s.column("group")[s.rows(name)]) for name in SPLITS}
        assert all(splits.values()) and not (splits["train"] & splits["val"] or splits["train"] & splits["test"]
                                             or splits["val"] & splits["test"])


def test_reader_refuses_incomplete_and_damaged_files(tmp_path):
    loaded = tiny_loaded("gpt2")
    out = tmp_path / "i.h5"
    interrupted(loaded, word_task(), out, ExtractConfig(block_examples=64, batch_tokens=64))
    partial = tmp_path / "i.h5.partial"
    assert not out.exists() and partial.exists()
    with pytest.raises(StoreError, match=r"i\.h5\.partial is an unfinished extraction: rerun it with --resume"):
        Store(out)
    with pytest.raises(StoreError, match="incomplete .* rerun it with --resume"):
        Store(partial)

    done = extract(loaded, word_task(), out, ExtractConfig(block_examples=64, batch_tokens=64), resume=True,
                   progress=False)
    damaged = tmp_path / "d.h5"
    shutil.copy(done, damaged)
    with h5py.File(damaged, "r+") as f:
        del f["label"]
    with pytest.raises(StoreError, match="damaged: dataset /label"):
        Store(damaged)
    with h5py.File(damaged, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="extract it again"):
        Store(damaged)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        Store(tmp_path / "junk.h5")


def test_scattered_reads_equal_point_reads_in_requested_order(big_store):
    rng = np.random.default_rng(0)
    with Store(big_store) as s:
        n = len(s)
        assert n > 8 * CHUNK_ROWS
        ds = s.file["z"]
        for rows in (rng.choice(n, 300, replace=False), rng.integers(0, n, 200),  # unsorted, with duplicates
                     np.sort(rng.choice(n, 50, replace=False))[::-1], np.array([n - 1, 0, n - 1]),
                     np.arange(CHUNK_ROWS - 3, 3 * CHUNK_ROWS + 5)):
            expected = np.stack([ds[int(i)] for i in rows]).astype(np.float32)
            np.testing.assert_array_equal(s.activations(rows=rows), expected)
            np.testing.assert_array_equal(s.activations(rows=list(rows), layers=[2, 0], heads=[3, 1]),
                                          expected[:, [2, 0]][:, :, [3, 1]])
        unique = np.sort(rng.choice(n, 100, replace=False))
        np.testing.assert_array_equal(s.activations(rows=unique, dtype=np.float16), ds[unique])  # h5py fancy read
        assert s.activations(rows=np.array([], dtype=int)).shape == (0, *s.shape[1:])
        with pytest.raises(StoreError, match="row indices"):
            s.activations(rows=[n])
        seen = np.concatenate([idx for idx, block in s.iter_blocks(block_rows=700)])
        np.testing.assert_array_equal(seen, np.arange(n))
        idx, block = next(s.iter_blocks(block_rows=700, rows=unique))
        np.testing.assert_array_equal(block, ds[idx].astype(np.float32))


def test_examples_without_a_group_are_each_their_own_group(tmp_path):
    """Splits treat an ungrouped example as a group of its own; the stored group ids say the same (no shared id
    across train, val and test)."""
    def make(seed: int) -> list[Example]:
        return [Example(text=f"{WORDS[i % 11]} {WORDS[(i * 7) % 11]}", label=i % 2,
                        group="pair" if i < 2 else "") for i in range(60)]

    task = Task("ungrouped", "ICI", "mostly ungrouped", ["a", "b"], make)
    with Store(extract(tiny_loaded("gpt2"), task, tmp_path / "u.h5", progress=False)) as s:
        group, split = s.file["group"][:], s.file["split"][:]
    assert len(np.unique(group)) == 59  # the pair shares one id, every other example has its own
    assert group[0] == group[1] and split[0] == split[1]
    for g in np.unique(group):
        assert len(np.unique(split[group == g])) == 1  # a group never spans splits
