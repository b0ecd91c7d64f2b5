"""Training under Lightning's DDP: `headprobe train linear --trainer.strategy ddp --trainer.devices 2` on 2 CPU
processes (torchrun, gloo) gives the per-head probe accuracies of 1 process, the DataModule shards the rows once
(not again by Lightning's distributed sampler), in memory and streamed, and an SAE's val metrics and token counts
cover all ranks. Newton probes on minibatches see every training row each epoch (ranks padded with empty batches)
and take the steps of one process.

The worker is this file run under torchrun: ``python tests/test_distributed_train.py STORE OUT``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from headprobe.extract.store import Store, write_array_store  # noqa: E402
from headprobe.train.data import StoreDataModule  # noqa: E402


def synthetic_store(path: Path, n: int = 4801, layers: int = 2, heads: int = 4, d_head: int = 16, seed: int = 0) -> Path:
    """A store whose heads carry the binary label with increasing strength (accuracies from ~60% to ~99%).

    z[n, l, h] = noise + s[l, h] * (2 y - 1) * u[l, h], with a random unit direction u per head. Splits are a
    deterministic 60/20/20 draw; odd split sizes exercise the uneven sharding of evaluation data.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = rng.normal(size=(layers, heads, d_head))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    strength = np.linspace(0.3, 3.0, layers * heads).reshape(layers, heads)
    z = rng.normal(size=(n, layers, heads, d_head)) + (2 * y - 1)[:, None, None, None] * strength[..., None] * u
    split = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
    return write_array_store(path, z, y, split, token_id=np.zeros(n, np.int32))


def probe_run(store: Path, out: Path, *trainer_args: str):
    """``headprobe train linear`` (per-head Newton probes) on ``store``; returns the CLI (model, trainer)."""
    from headprobe.train.train_cli import expand_short_form, run

    return run(expand_short_form(["linear", "--data.path", str(store), "--out", str(out), "--logger", "none",
                                  "--test", "false", "--model.controls", "[]", *trainer_args]))


def shard_rows(store: Path, in_memory: bool, module: L.LightningModule) -> dict:
    """Rows of this rank's training and validation batches after Lightning's dataloader processing (batch 64),
    and its number of training batches, when fitting ``module``."""
    dm = StoreDataModule(str(store), batch_size=64, in_memory=in_memory, shuffle_buffer=256)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", strategy="ddp", devices=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, dm)
    out = {split: [r for batch in loader for r in batch["row"].tolist()]
           for split, loader in (("train", trainer.train_dataloader), ("val", trainer.val_dataloaders))}
    return {**out, "train_batches": sum(1 for _ in trainer.train_dataloader)}


def newton_fit(store: Path, out: Path, in_memory: bool, ddp: bool = False) -> dict:
    """Linear probes fitted on batches of 64 (one Newton step per epoch): steps taken, rows per epoch, weights."""
    two = ("--trainer.strategy", "ddp", "--trainer.devices", "2") if ddp else ()
    cli = probe_run(store, out, "--data.batch_size", "64", "--data.in_memory", str(in_memory).lower(), *two)
    m = cli.model
    return {"steps": m.newton.steps, "rows": m._n_all, "W": m.newton.W[0].flatten().tolist()}


def sae_run(store: Path) -> dict:
    """A TopK SAE for 2 epochs under DDP (2 CPU processes); the logged val metrics, the tokens it counted, and
    the same metrics computed afresh over the whole val split with the final weights."""
    from headprobe.probes.sae import SparseAutoencoder
    from headprobe.probes.sae_eval import evaluate

    dm = StoreDataModule(str(store), batch_size=128, in_memory=True)
    sae = SparseAutoencoder(architecture="topk", expansion=4, k=8, b_dec_init="mean", dead_after_tokens=500)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", strategy="ddp", devices=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(sae, dm)
    fresh = evaluate(sae, [dm.split("val")[np.arange(len(dm.split("val")))]["z"]])
    return {"logged": {k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("fve", "l0", "n_tokens")},
            "fresh": {k: float(fresh[k]) for k in ("fve", "l0", "n_tokens")}, "tokens_seen": int(sae.tokens_seen),
            "steps": trainer.global_step}


def test_full_pass_sharding_covers_every_row_once_with_equal_batches_per_rank(tmp_path, monkeypatch):
    """Simulated ranks and dataloader workers (no processes): with ``full_pass``, the ranks' training batches hold
    every row exactly once and each rank takes as many batches as the others, in memory and streamed."""
    import types

    import headprobe.train.data as data

    store = synthetic_store(tmp_path / "syn.h5", n=5000)
    with Store(store) as s:
        rows = s.rows("train")
    for world, workers in [(3, 1), (2, 2), (4, 3), (3, 2)]:
        seen, batches = [], []
        for rank in range(world):
            monkeypatch.setattr(data, "_dist", lambda rank=rank: (rank, world))
            sampler = data.EpochBatches(len(rows), 64, shuffle=True, seed=1, full_pass=True)
            sampler.set_epoch(2)
            mine = list(sampler)
            assert len(mine) == len(sampler)
            stream = data.StreamingRows(str(store), rows, 64, shuffle=True, seed=1, block_rows=256, buffer_rows=512,
                                        full_pass=True)
            stream.set_epoch(2)
            streamed = []
            for wid in range(workers):
                monkeypatch.setattr(data, "get_worker_info", lambda wid=wid: types.SimpleNamespace(id=wid,
                                                                                                 num_workers=workers))
                streamed += list(stream)
            seen.append((np.concatenate(mine), np.concatenate([b["row"].numpy() for b in streamed])))
            batches.append((len(mine), len(streamed)))
        for kind in range(2):  # 0: in memory (positions into the split), 1: streamed (store rows)
            got = np.sort(np.concatenate([s[kind] for s in seen]))
            np.testing.assert_array_equal(got, np.arange(len(rows)) if kind == 0 else np.sort(rows))
            assert len({b[kind] for b in batches}) == 1, (world, workers, kind, batches)


def test_streamed_whole_split_batches_under_ddp_are_equal_shares(tmp_path, monkeypatch):
    """batch_size 0 (sparse probes' default) on a streamed store, 2 simulated ranks: one equal, non-empty batch
    each (the whole split is larger than either rank's share, which once left every rank with no batch)."""
    import headprobe.train.data as data

    store = synthetic_store(tmp_path / "syn.h5", n=5000)
    sizes = []
    for rank in range(2):
        monkeypatch.setattr(data, "_dist", lambda rank=rank: (rank, 2))
        dm = StoreDataModule(str(store), batch_size=0, in_memory=False, block_chunks=1)
        sizes.append([len(b["row"]) for b in dm.train_dataloader()])
    assert len(sizes[0]) == len(sizes[1]) == 1 and sizes[0] == sizes[1] and sizes[0][0] > 0, sizes
    with pytest.raises(ValueError, match="cannot feed every process and dataloader worker"):
        monkeypatch.setattr(data, "_dist", lambda: (0, 64))
        list(StoreDataModule(str(store), batch_size=0, in_memory=False).train_dataloader())


def test_ddp_two_processes_match_one_process(tmp_path):
    from helpers import torchrun

    store = synthetic_store(tmp_path / "syn.h5")
    acc1 = probe_run(store, tmp_path / "single").model.tables["val"]["acc"][0]  # (L, H)
    assert acc1.min() < 0.7 and acc1.max() > 0.95  # the heads differ

    rc, out, err = torchrun(2, str(Path(__file__)), str(store), str(tmp_path / "ddp"))
    assert rc == 0, err[-3000:]
    results = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in range(2)]
    with Store(store) as s:
        n_train, n_val = len(s.rows("train")), len(s.rows("val"))
    for r in results:
        print("per-head val accuracy, 1 process:", acc1.round(4).tolist(), "\nDDP rank", r["rank"],
              np.round(r["acc"], 4).tolist())
        np.testing.assert_allclose(r["acc"], acc1, atol=0.005)  # per-head accuracies within 0.5 points
    assert json.loads((tmp_path / "ddp" / "heads.json").read_text())["heads"]  # rank 0 exported the run
    for mode in ("memory", "stream"):
        train0, train1 = (r[mode]["train"] for r in results)
        assert not set(train0) & set(train1), mode  # disjoint training shares, sharded once (not by Lightning again)
        if mode == "memory":  # equal steps cost at most the remainder n_train % 2
            assert len(train0) == len(train1) == n_train // 2
        else:  # streamed whole blocks of 2048 store rows: the rank with fewer rows sets the steps
            assert len(train0) == len(train1) and 0 < len(train0) <= n_train // 2 and len(train0) % 64 == 0
        val0, val1 = (r[mode]["val"] for r in results)
        assert not set(val0) & set(val1) and len(val0) + len(val1) == n_val, mode  # every val row exactly once
        # Newton probes sum over the epoch: every training row once, ranks padded to the same number of batches
        full0, full1 = (r[mode + "_full"] for r in results)
        assert not set(full0["train"]) & set(full1["train"]), mode
        assert len(full0["train"]) + len(full1["train"]) == n_train, mode
        assert full0["train_batches"] == full1["train_batches"], mode
    for in_memory in (True, False):  # batches of 64 under DDP: the same Newton steps as one process, to float error
        one = newton_fit(store, tmp_path / f"one_{in_memory}", in_memory)
        for r in results:
            two = r[f"newton_{in_memory}"]
            steps = (one["steps"], two["steps"])
            assert one["rows"] == two["rows"] == n_train and steps[0] == steps[1] < 20, steps
            np.testing.assert_allclose(two["W"], one["W"], atol=1e-7)
    for r in results:  # SAE under DDP: val metrics reduced over ranks; tokens counted over ranks
        sae = r["sae"]
        assert sae["logged"]["n_tokens"] == sae["fresh"]["n_tokens"] == n_val
        assert abs(sae["logged"]["fve"] - sae["fresh"]["fve"]) < 1e-5 and abs(sae["logged"]["l0"] - sae["fresh"]["l0"]) < 1e-4
        assert sae["tokens_seen"] == 2 * (n_train // 2) * 2  # 2 epochs of both ranks' equal shares


if __name__ == "__main__":  # worker under torchrun: python tests/test_distributed_train.py STORE OUT
    torch.set_num_threads(1)
    store, out = Path(sys.argv[1]), Path(sys.argv[2])
    cli = probe_run(store, out, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    from headprobe.probes.linear import LinearProbes
    from headprobe.probes.sae import SparseAutoencoder

    equal_steps = dict(architecture="topk", expansion=2, k=4)  # a minibatch trainer: equal shares per rank
    result = {"rank": cli.trainer.global_rank, "acc": cli.model.tables["val"]["acc"][0].tolist(),
              **{mode: shard_rows(store, mode == "memory", SparseAutoencoder(**equal_steps))
                 for mode in ("memory", "stream")},
              **{mode + "_full": shard_rows(store, mode == "memory", LinearProbes(controls=[]))
                 for mode in ("memory", "stream")},
              **{f"newton_{m}": newton_fit(store, Path(f"{out}_newton_{m}"), m, ddp=True) for m in (True, False)},
              "sae": sae_run(store)}
    Path(f"{out}.rank{result['rank']}.json").write_text(json.dumps(result))
