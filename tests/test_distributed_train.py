"""Training under Lightning's DDP: 2 CPU processes (gloo) give the per-head probe accuracies of 1 process.

The worker (``python tests/test_distributed_train.py STORE OUT.json``) trains under whatever strategy Lightning
gets from its environment, so the same code runs as 1 process and under ``torchrun --nproc_per_node 2``.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from extract.store import Store, StoreMeta, StoreWriter  # noqa: E402
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
    split = rng.choice(3, size=n, p=[0.6, 0.2, 0.2]).astype(np.int8)
    meta = StoreMeta(model_id="synthetic", weights_hash="0", architecture="llama", hook_point="synthetic",
                     n_layers=layers, layers=list(range(layers)), n_heads=heads, n_kv_heads=heads, d_head=d_head,
                     d_model=heads * d_head, dtype="float32", position_rule="last", padding_side="right", bos=False,
                     task="synthetic", stage="KR", label_names=["no", "yes"], label_kind="class",
                     dataset_hash=str(seed), n_examples=n, n_rows=n, has_writes=False, headprobe_version="test",
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    writer = StoreWriter(path, meta, np.int64, resume=False)
    writer.write_block(n, {"z": z.astype(np.float32), "label": y, "split": split, "example_id": np.arange(n),
                           "group": np.arange(n), "token_id": np.zeros(n, np.int32), "position": np.zeros(n, np.int32)})
    return writer.finish()


class HeadLogistic(L.LightningModule):
    """One logistic regression per (layer, head), all at once: logits (B, L, H) = einsum(z, W) + b.

    The loss sums the heads' mean log-losses (heads are independent). Validation counts correct predictions per
    head and reduces the counts (a sum over ranks), so every rank reports accuracy over the whole split.
    """

    def __init__(self, n_layers: int, n_heads: int, d_head: int, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.W = nn.Parameter(torch.zeros(n_layers, n_heads, d_head))
        self.b = nn.Parameter(torch.zeros(n_layers, n_heads))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blhd,lhd->blh", z, self.W) + self.b

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["z"])
        y = batch["label"].float()[:, None, None].expand_as(logits)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0).sum()
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros_like(self.b)
        self._n = torch.zeros((), device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred = self(batch["z"]) > 0
        self._correct += (pred == batch["label"].bool()[:, None, None]).sum(0)
        self._n += len(pred)

    def on_validation_epoch_end(self) -> None:
        correct = self.trainer.strategy.reduce(self._correct, reduce_op="sum")
        n = self.trainer.strategy.reduce(self._n, reduce_op="sum")
        self.val_acc, self.val_rows = correct / n, int(n)
        self.log("val/acc_mean", self.val_acc.mean())  # identical on every rank: no further sync needed

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit(store: Path, epochs: int, batch_size: int, in_memory: bool, strategy: str, devices) -> tuple:
    L.seed_everything(0, verbose=False)
    dm = StoreDataModule(str(store), batch_size=batch_size, in_memory=in_memory, shuffle_buffer=256)
    model = HeadLogistic(dm.n_layers, dm.n_heads, dm.meta.d_head)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", strategy=strategy, devices=devices, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=epochs)
    trainer.fit(model, dm)
    return model, trainer


def train(store: Path, epochs: int = 60, strategy: str = "auto", devices: int | str = "auto",
          record_rows: bool = False) -> dict:
    """Full-batch training of :class:`HeadLogistic` (per-head val accuracies), then one minibatch epoch in memory
    and one streamed, recording the rows this rank's training and validation batches hold after Lightning's
    dataloader processing."""
    model, trainer = fit(store, epochs, 0, True, strategy, devices)
    out = {"acc": model.val_acc.tolist(), "val_rows": model.val_rows, "rank": trainer.global_rank,
           "world": trainer.world_size}
    for mode, in_memory in (("memory", True), ("stream", False)) if record_rows else ():
        _, trainer = fit(store, 1, 64, in_memory, strategy, devices)
        for split, loader in (("train", trainer.train_dataloader), ("val", trainer.val_dataloaders)):
            rows = [r for batch in loader for r in batch["row"].tolist()]
            out[f"{mode}_{split}_rows"] = rows
            out[f"{mode}_{split}_batches"] = len(loader) if mode == "memory" else -(-len(rows) // 64)
    return out


def test_ddp_two_processes_match_one_process(tmp_path):
    from tests.test_distributed import torchrun

    store = synthetic_store(tmp_path / "syn.h5")
    single = train(store)
    acc1 = np.array(single["acc"])
    assert single["world"] == 1 and acc1.min() < 0.7 and acc1.max() > 0.95  # the heads differ

    rc, out, err = torchrun(2, str(Path(__file__)), str(store), str(tmp_path / "ddp"))
    assert rc == 0, err[-3000:]
    results = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in range(2)]
    with Store(store) as s:
        n_train, n_val = len(s.rows("train")), len(s.rows("val"))
    for r in results:
        assert r["world"] == 2
        assert r["val_rows"] == n_val  # evaluation covers every row once, over both ranks
        print("per-head val accuracy, 1 process:", acc1.round(4).tolist(), "\nDDP rank", r["rank"], np.round(r["acc"], 4).tolist())
        np.testing.assert_allclose(r["acc"], acc1, atol=0.005)  # per-head accuracies within 0.5 points
    for mode in ("memory", "stream"):
        train0, train1 = (r[f"{mode}_train_rows"] for r in results)
        assert not set(train0) & set(train1), mode  # disjoint training shares, sharded once (not by Lightning again)
        assert len(train0) == len(train1) and results[0][f"{mode}_train_batches"] == results[1][f"{mode}_train_batches"]
        if mode == "memory":  # equal steps cost at most the remainder n_train % 2
            assert len(train0) == n_train // 2
        else:  # streamed whole blocks of 2048 store rows: the rank with fewer rows sets the steps
            assert 0 < len(train0) <= n_train // 2 and len(train0) % 64 == 0
        val0, val1 = (r[f"{mode}_val_rows"] for r in results)
        assert not set(val0) & set(val1) and len(val0) + len(val1) == n_val, mode  # every val row exactly once


if __name__ == "__main__":  # worker: python tests/test_distributed_train.py STORE OUT_PREFIX
    torch.set_num_threads(1)
    result = train(Path(sys.argv[1]), strategy="ddp", devices=2, record_rows=True)
    Path(f"{sys.argv[2]}.rank{result['rank']}.json").write_text(json.dumps(result))
