"""Training under Lightning's DDP: `headprobe train linear --trainer.strategy ddp --trainer.devices 2` on 2 CPU
processes (torchrun, gloo) gives the per-head probe accuracies of 1 process, the DataModule shards the rows once
(not again by Lightning's distributed sampler), in memory and streamed, and an SAE's val metrics and token counts
cover all ranks.

The worker is this file run under torchrun: ``python tests/test_distributed_train.py STORE OUT``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from extract.store import Store, write_array_store  # noqa: E402
from train.data import StoreDataModule  # noqa: E402


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
    from train.fit import expand_short_form, run

    return run(expand_short_form(["linear", "--data.path", str(store), "--out", str(out), "--logger", "none",
                                  "--test", "false", "--model.controls", "[]", *trainer_args]))


def shard_rows(store: Path, in_memory: bool) -> dict:
    """Rows of this rank's training and validation batches after Lightning's dataloader processing (batch 64)."""
    from probes.linear import LinearProbes

    dm = StoreDataModule(str(store), batch_size=64, in_memory=in_memory, shuffle_buffer=256)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", strategy="ddp", devices=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(LinearProbes(controls=[]), dm)
    return {split: [r for batch in loader for r in batch["row"].tolist()]
            for split, loader in (("train", trainer.train_dataloader), ("val", trainer.val_dataloaders))}


def sae_run(store: Path) -> dict:
    """A TopK SAE for 2 epochs under DDP (2 CPU processes); the logged val metrics, the tokens it counted, and
    the same metrics computed afresh over the whole val split with the final weights."""
    from probes.sae import SparseAutoencoder
    from probes.sae_eval import evaluate

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


def test_ddp_two_processes_match_one_process(tmp_path):
    from tests.test_distributed import torchrun

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
    for r in results:  # SAE under DDP: val metrics reduced over ranks; tokens counted over ranks
        sae = r["sae"]
        assert sae["logged"]["n_tokens"] == sae["fresh"]["n_tokens"] == n_val
        assert abs(sae["logged"]["fve"] - sae["fresh"]["fve"]) < 1e-5 and abs(sae["logged"]["l0"] - sae["fresh"]["l0"]) < 1e-4
        assert sae["tokens_seen"] == 2 * (n_train // 2) * 2  # 2 epochs of both ranks' equal shares


if __name__ == "__main__":  # worker under torchrun: python tests/test_distributed_train.py STORE OUT
    torch.set_num_threads(1)
    store, out = Path(sys.argv[1]), Path(sys.argv[2])
    cli = probe_run(store, out, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    result = {"rank": cli.trainer.global_rank, "acc": cli.model.tables["val"]["acc"][0].tolist(),
              "memory": shard_rows(store, True), "stream": shard_rows(store, False), "sae": sae_run(store)}
    Path(f"{out}.rank{result['rank']}.json").write_text(json.dumps(result))
