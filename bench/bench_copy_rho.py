"""Does more data raise the copy task's Spearman rho against the induction scores (issue 6's goal: 0.5)?

Extracts ``repeat_tokens`` with ``--examples`` word lists per size (200 is the built-in task), fits one logistic
probe per head on the train split (``probes.newton.fit_newton``, one L2 strength per run), and prints per size and
L2 the rho over all heads between the induction scores and each head's held-out (val + test) accuracy and minus
its log loss; the same over layers 0-16 (before the first induction head, where probe accuracy is near chance);
and the rho reached if layers 0-16 were ordered exactly as their induction scores, the rest as measured.

    python bench/bench_copy_rho.py                          # 200 and 1000 lists, ~5 min on 2 cores
    python bench/bench_copy_rho.py --examples 200 --l2 1
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.models import load_model
from headprobe.extract.store import Store
from headprobe.extract.tasks import get_task
from headprobe.extract.tasks.builtin import _repeats
from headprobe.probes.checks.head_scores import head_type_scores
from headprobe.probes.newton import fit_newton


def held_out_scores(store: Store, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-head held-out accuracy and log loss of per-head logistic probes fit on the train split: two (L, H)."""
    z = torch.from_numpy(np.asarray(store.activations(np.arange(store.shape[0]))).astype(np.float64))
    N, L, H, D = z.shape
    x, y = z.reshape(N, L * H, D), torch.from_numpy(store.labels).double()
    fit, held = store.rows("train"), np.concatenate([store.rows("val"), store.rows("test")])
    W, _ = fit_newton(x[fit], y[fit, None], "logistic", l2=l2)
    logits = torch.einsum("npf,pf->np", x[held], W[0, :, :D, 0]) + W[0, :, D, 0]  # (N_held, L*H)
    truth = y[held, None]
    acc = ((logits > 0).double() == truth).double().mean(0)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, truth.expand_as(logits), reduction="none")
    return acc.reshape(L, H).numpy(), loss.mean(0).reshape(L, H).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, nargs="+", default=[200, 1000], help="word lists per extraction")
    p.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="probe L2 strengths")
    p.add_argument("--out", type=Path, default=Path("bench/results/copy_rho.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    induction = head_type_scores(loaded.model)["induction"]
    first = int(np.argmax((induction > 0.4).any(1)))  # the first layer with an induction head

    def rho(score: np.ndarray, layers: slice = slice(None)) -> float:
        return float(spearmanr(score[layers].ravel(), induction[layers].ravel())[0])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.examples:
            task = dataclasses.replace(get_task("repeat_tokens"), make=functools.partial(_repeats, n=n))
            start = time.time()
            store = Store(extract(loaded, task, Path(tmp) / f"r{n}.h5", ExtractConfig(), progress=False))
            print(f"{n} lists: {store.shape[0]} rows, extracted in {time.time() - start:.0f} s", flush=True)
            for l2 in args.l2:
                acc, loss = held_out_scores(store, l2)
                early = slice(0, first)
                ordered = acc.copy()
                ordered[early] = acc[first:].min() - 1 + induction[early]  # below every later head, in induction order
                row = {"lists": n, "rows": int(store.shape[0]), "l2": l2, "rho_acc": rho(acc),
                       "rho_neg_loss": rho(-loss),
                       "rho_acc_early": rho(acc, early), "rho_neg_loss_early": rho(-loss, early),
                       "rho_acc_if_early_ordered": rho(ordered), "first_induction_layer": first}
                rows.append(row)
                print(f"  l2 {l2:g}: rho accuracy {row['rho_acc']:.2f}, -loss {row['rho_neg_loss']:.2f}; layers "
                      f"0-{first - 1}: {row['rho_acc_early']:.2f}, {row['rho_neg_loss_early']:.2f}; with layers "
                      f"0-{first - 1} in induction order: {row['rho_acc_if_early_ordered']:.2f}", flush=True)
            store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
