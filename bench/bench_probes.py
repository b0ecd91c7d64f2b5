"""Batched per-head probes (headprobe) against the ITI recipe (one sklearn LogisticRegression(C=1) per head), timed
in one run on the same data, at two scales:

  (a) the default model's size: 2,000 examples x 270 heads (30 x 9) x d_head 64; goal: no slower, Lightning included
  (b) a 7B model's size: 5,000 examples x 1,024 heads (32 x 32) x d_head 128; goal: >= 10x faster

Activations are synthetic with realistic per-head scales (log-uniform over 0.015..1.3, as measured on SmolLM2's
last-token z), one binary label, and signal of varied strength written into a third of the heads. The loop is the
ITI recipe (default tol, max_iter=1000); agreement is measured against the loop refitted with tol=1e-8 (val
accuracy, 80/20 split). ``--loop-heads`` times the loop on a subset of heads and scales the time up (printed).

    python bench/bench_probes.py                       # both scales
    python bench/bench_probes.py --scale a --threads 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

SCALES = {"a": (2000, 30, 9, 64), "b": (5000, 32, 32, 128)}


def synthetic(n: int, L: int, H: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(np.log(0.015), np.log(1.3), size=(L, H))).astype(np.float32)
    y = rng.integers(0, 2, n)
    z = rng.standard_normal((n, L, H, D), dtype=np.float32)
    strength = np.where(rng.random((L, H)) < 1 / 3, rng.uniform(0.05, 0.6, (L, H)), 0).astype(np.float32)
    direction = rng.standard_normal((L, H, D)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    z += ((2 * y - 1)[:, None, None, None] * strength[None, :, :, None] * direction[None]).astype(np.float32)
    z *= scale[None, :, :, None]
    split = (rng.random(n) < 0.2).astype(np.int8)  # 0 train, 1 val
    return z.astype(np.float16).astype(np.float32), y, split


def sklearn_loop(x: np.ndarray, y: np.ndarray, split: np.ndarray, heads: np.ndarray, tol: float):
    from sklearn.linear_model import LogisticRegression

    tr, va = split == 0, split == 1
    acc, zero = [], []
    t = time.perf_counter()
    for p in heads:
        clf = LogisticRegression(C=1.0, tol=tol, max_iter=1000 if tol >= 1e-4 else 10000).fit(x[tr, p], y[tr])
        acc.append((clf.predict(x[va, p]) == y[va]).mean())
        zero.append(not clf.coef_.any())
    return time.perf_counter() - t, np.array(acc), np.array(zero)


def newton_direct(x: np.ndarray, y: np.ndarray, split: np.ndarray):
    from probes.linear import fit_newton

    tr, va = split == 0, split == 1
    t = time.perf_counter()
    xt = torch.from_numpy(x)
    W, info = fit_newton(xt[torch.from_numpy(tr)], torch.from_numpy(y[tr])[:, None].double(), "logistic")
    W = W[0, :, :, 0]
    logits = torch.einsum("npf,pf->np", xt[torch.from_numpy(va)].double(), W[:, :-1]) + W[:, -1]
    acc = ((logits > 0).long().numpy() == y[va, None]).mean(0)
    return time.perf_counter() - t, acc, info


def newton_lightning(z: np.ndarray, y: np.ndarray, split: np.ndarray, folder: Path):
    """LinearProbes through a Lightning Trainer on a store written with StoreWriter (the write is not timed)."""
    import lightning as L

    from probes.linear import LinearProbes
    from train.data import StoreDataModule, write_array_store

    path = write_array_store(folder / "bench.h5", z, y, split, dtype="float16")
    t = time.perf_counter()
    module = LinearProbes(controls=[], n_boot=200)
    trainer = L.Trainer(max_epochs=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=50)
    trainer.fit(module, StoreDataModule(str(path), batch_size=0, in_memory=True))
    trainer.validate(module, StoreDataModule(str(path), batch_size=0, in_memory=True), verbose=False)
    return time.perf_counter() - t, module.tables["val"]["acc"][0].ravel()


def agreement(ours: np.ndarray, ref: np.ndarray, k: int = 16) -> str:
    top = lambda a: set(np.argsort(-a, kind="stable")[:k])
    return (f"mean |delta val acc| {np.abs(ours - ref).mean() * 100:.3f} points, "
            f"top-{k} overlap {len(top(ours) & top(ref)) / k:.0%}")


def bench(scale: str, loop_heads: int, lightning: bool) -> None:
    n, L_, H, D = SCALES[scale]
    z, y, split = synthetic(n, L_, H, D)
    P = L_ * H
    x = z.reshape(n, P, D)
    heads = np.arange(P) if loop_heads <= 0 or loop_heads >= P else np.linspace(0, P - 1, loop_heads).astype(int)
    factor = P / len(heads)
    print(f"\n({scale}) {n} examples x {P} heads ({L_} x {H}) x d_head {D}; torch threads {torch.get_num_threads()}")
    t_loop, acc_loop, zero = sklearn_loop(x, y, split, heads, tol=1e-4)
    note = f" (timed on {len(heads)} heads, x{factor:.1f})" if factor > 1 else ""
    print(f"  sklearn loop, ITI recipe (tol 1e-4):  {t_loop * factor:8.2f} s{note}; "
          f"{zero.sum()} heads with all-zero weights: {[(int(p // H), int(p % H)) for p in heads[zero]]}")
    t_tight, acc_tight, zero_tight = sklearn_loop(x, y, split, heads, tol=1e-8)
    print(f"  sklearn loop, tol 1e-8:               {t_tight * factor:8.2f} s{note}; "
          f"{zero_tight.sum()} all-zero heads")
    t_new, acc_new, info = newton_direct(x, y, split)
    print(f"  headprobe batched Newton (no Lightning): {t_new:6.2f} s  ({info['steps']} steps, {info['hessians']} "
          f"Hessians)  {t_loop * factor / t_new:5.1f}x vs ITI loop, {t_tight * factor / t_new:5.1f}x vs tight; "
          f"vs tight: {agreement(acc_new[heads], acc_tight)}; vs ITI loop: {agreement(acc_new[heads], acc_loop)}")
    if lightning:
        with tempfile.TemporaryDirectory() as tmp:
            t_l, acc_l = newton_lightning(z, y, split, Path(tmp))
        print(f"  headprobe LinearProbes (Lightning):      {t_l:6.2f} s  {t_loop * factor / t_l:5.1f}x vs ITI loop, "
              f"{t_tight * factor / t_l:5.1f}x vs tight; vs tight: {agreement(acc_l[heads], acc_tight)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=["a", "b", "both"], default="both")
    p.add_argument("--loop-heads", type=int, default=0, help="time the sklearn loop on this many heads (0: all)")
    p.add_argument("--loop-heads-b", type=int, default=128, help="the same at scale (b)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-lightning-b", action="store_true", help="skip the Lightning run at scale (b)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.scale in ("a", "both"):
        bench("a", args.loop_heads, lightning=True)
    if args.scale in ("b", "both"):
        bench("b", args.loop_heads_b, lightning=not args.no_lightning_b)


if __name__ == "__main__":
    main()
