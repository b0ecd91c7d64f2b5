"""Benchmark: headprobe's TopK SAE against EleutherAI's sparsify on the same cached activations, in one run.

Both train a TopK SAE (d_sae 4608, k 32, batch 4096 tokens) on the train+val rows of an all-token store for the
same token budget, with the same torch thread count, and are evaluated on the store's held-out test rows:
tokens/s (wall time of the whole fit call), held-out FVE, L0 and the share of latents never firing on held-out
tokens. Then headprobe's SAE is spliced into the model on held-out text for CE loss recovered (zero- and
mean-ablation), and the same is done for a single-head SAE.

    headprobe extract --model smollm2-135m --task corpus --layers 15 --out corpus_l15.h5
    pip install --no-deps --target /tmp/sparsify_pkgs eai-sparsify==1.3.3 einops natsort simple-parsing schedulefree
    python bench/bench_sae.py --store corpus_l15.h5 --sparsify-path /tmp/sparsify_pkgs

sparsify is never a headprobe dependency. It trains only by hooking a live model, so it is fed the cached rows
through a stand-in module whose single "layer" returns the cached activations of the row indices it is given as
"input_ids". It runs with its own defaults (signum optimizer, auto LR, no AuxK) apart from width, k and batch.
Timings on a shared machine are noisy: compare the two numbers of one run, not runs with each other.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

from headprobe.extract.store import Store
from headprobe.probes.sae import SparseAutoencoder
from headprobe.probes.sae_eval import (ReconstructionStats, ce_loss_recovered, density_histogram, evaluate,
                                       store_sequences, token_batches)
from headprobe.train.data import EpochBatches, InMemoryRows

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def load_rows(path: str, head: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train+val rows, test rows) of the first stored layer, (N, d_in) float16, heads concatenated."""
    with Store(path) as store:
        z = store.activations(slice(None), layers=[0], heads=None if head is None else [head], dtype=np.float16)
        split = store.column("split")
    z = z.reshape(len(z), -1)
    return z[split != 2], z[split == 2]


def batches(x: np.ndarray, size: int = 4096):
    for i in range(0, len(x), size):
        yield torch.from_numpy(x[i:i + size]).float()


def train_headprobe(train: np.ndarray, tokens: int, d_sae: int, k: int, batch: int, seed: int, **hp
                    ) -> tuple[SparseAutoencoder, float]:
    """Fit with Lightning on in-memory rows (the StoreDataModule's in-memory path); returns (sae, seconds)."""
    t0 = time.perf_counter()
    sae = SparseAutoencoder(d_in=train.shape[1], d_sae=d_sae, k=k, token_budget=tokens, seed=seed, **hp)
    sample = np.random.default_rng(seed).choice(len(train), min(len(train), sae.hparams.init_rows), replace=False)
    sae.initialise(torch.from_numpy(train[np.sort(sample)]).float())
    rows = InMemoryRows(train, -np.ones(len(train), np.int64), np.arange(len(train)))
    loader = torch.utils.data.DataLoader(rows, sampler=EpochBatches(len(train), batch, True, seed, drop_last=True),
                                         batch_size=None)
    L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, accelerator="cpu").fit(sae, loader)
    return sae.eval(), time.perf_counter() - t0


class CachedActivations(nn.Module):
    """A stand-in "model" for sparsify: ``input_ids`` are row indices; layer 0 outputs those cached rows."""

    def __init__(self, rows: np.ndarray):
        super().__init__()
        self.rows = torch.from_numpy(rows)
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = types.SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return self.layers[0](self.rows[input_ids].float())  # (B, S, d_in)


def train_sparsify(train: np.ndarray, tokens: int, d_sae: int, k: int, batch: int, seed: int, path: str | None):
    """sparsify's Trainer on the cached rows; returns (its SAE, seconds)."""
    if path:
        sys.path.insert(0, path)
    try:  # sparsify imports Hugging Face datasets for its own data loading, which is not used here
        from datasets import Dataset  # noqa: F401
    except ImportError:  # (a repository folder named datasets/ can shadow the package: stub it for sparsify)
        stub = types.ModuleType("datasets")
        stub.Dataset = stub.DatasetDict = stub.load_dataset = None
        sys.modules["datasets"] = stub
    from sparsify import SaeConfig, TrainConfig, Trainer

    seq = 256
    n_seq = tokens // seq
    order = np.concatenate([np.random.default_rng((seed, e)).permutation(len(train))
                            for e in range(tokens // len(train) + 1)])[:n_seq * seq]
    data = [{"input_ids": torch.from_numpy(s)} for s in order.reshape(n_seq, seq)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(SaeConfig(k=k, num_latents=d_sae), batch_size=batch // seq, hookpoints=["layers.0"],
                          log_to_wandb=False, save_every=10**9, save_dir=tmp, init_seeds=[seed])
        t0 = time.perf_counter()
        trainer = Trainer(cfg, data, CachedActivations(train))
        trainer.fit()
        seconds = time.perf_counter() - t0
    return trainer.saes["layers.0"].eval(), seconds


@torch.no_grad()
def evaluate_sparsify(sae, test: np.ndarray) -> dict:
    stats = ReconstructionStats(sae.num_latents)
    for x in batches(test):
        out = sae(x)
        f = torch.zeros(len(x), sae.num_latents).scatter_(1, out.latent_indices, out.latent_acts)
        stats.update(x, out.sae_out, f)
    return stats.compute()


def summary(name: str, tokens: int, seconds: float, m: dict) -> dict:
    row = {"trainer": name, "tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds),
           "heldout_fve": round(m["fve"], 4), "l0": round(m["l0"], 2), "never_fire": round(m["dead_frac"], 4),
           "heldout_tokens": m["n_tokens"]}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="all-token store of one layer (e.g. layer 15 of smollm2-135m)")
    p.add_argument("--tokens", type=int, default=1_200_000)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.0, help="headprobe LR (0: its default)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for both trainers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsify-path", default=None, help="folder where eai-sparsify was pip-installed (--target)")
    p.add_argument("--skip-sparsify", action="store_true")
    p.add_argument("--ce-tokens", type=int, default=8192, help="held-out tokens for CE loss recovered (0: skip)")
    p.add_argument("--head", type=int, default=0, help="head of the single-head SAE")
    p.add_argument("--out", type=Path, default=Path("bench/results/sae"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, test = load_rows(args.store)
    print(f"rows: {len(train)} train+val, {len(test)} held-out, d_in {train.shape[1]}; budget {args.tokens} tokens "
          f"({args.tokens / len(train):.1f} passes); threads {args.threads}", flush=True)
    results = []
    sae, sec = train_headprobe(train, args.tokens, args.d_sae, args.k, args.batch, args.seed, lr=args.lr)
    m = evaluate(sae, batches(test))
    results.append(summary("headprobe", int(sae.tokens_seen), sec, m))
    args.out.mkdir(parents=True, exist_ok=True)
    density_histogram(m["fire_counts"], m["n_tokens"], args.out / "density_headprobe.png",
                      "headprobe TopK SAE, layer-15 z: held-out feature density")
    if not args.skip_sparsify:
        sp, sec = train_sparsify(train, args.tokens, args.d_sae, args.k, args.batch, args.seed, args.sparsify_path)
        ms = evaluate_sparsify(sp, test)
        results.append(summary("sparsify", (args.tokens // 256) * 256, sec, ms))
        density_histogram(ms["fire_counts"], ms["n_tokens"], args.out / "density_sparsify.png",
                          "sparsify TopK SAE, layer-15 z: held-out feature density")
        print(f"ratio headprobe/sparsify tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}; "
              f"held-out FVE {results[0]['heldout_fve']:.4f} vs {results[1]['heldout_fve']:.4f}", flush=True)

    if args.ce_tokens:
        from headprobe.extract.models import load_model

        with Store(args.store) as store:
            layer, meta = store.meta.layers[0], store.meta
        loaded = load_model(meta.model_id)
        seqs = token_batches(store_sequences(args.store, "test", args.ce_tokens), batch_size=8)
        mean_all = torch.from_numpy(train.astype(np.float64).mean(0)).float()
        ce = ce_loss_recovered(loaded.model, sae, seqs, mean_all, layer=layer, heads=None)
        print(json.dumps({"ce_layer": layer, **{k: round(v, 4) for k, v in ce.items()}}), flush=True)
        results.append({"ce_all_heads": ce})
        head = args.head
        h_train, h_test = load_rows(args.store, head)
        h_sae, h_sec = train_headprobe(h_train, args.tokens, 8 * h_train.shape[1], 8, args.batch, args.seed)
        hm = evaluate(h_sae, batches(h_test))
        results.append(summary(f"headprobe head {head} (d_sae {8 * h_train.shape[1]}, k 8)", int(h_sae.tokens_seen),
                               h_sec, hm))
        h_mean = torch.from_numpy(h_train.astype(np.float64).mean(0)).float()
        ce_h = ce_loss_recovered(loaded.model, h_sae, seqs, h_mean, layer=layer, heads=[head],
                                 ce_clean=ce["ce_clean"])
        print(json.dumps({"ce_layer": layer, "head": head, **{k: round(v, 4) for k, v in ce_h.items()}}), flush=True)
        results.append({"ce_single_head": ce_h})
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
