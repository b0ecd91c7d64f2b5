"""Attribution on the default model: extract built-in tasks, train per-head linear probes (with a shuffled-label
control) and a group-lasso probe on each, then run ``headprobe attribute`` with the attention-pattern cross-check
and the ablation check. Prints the induction heads, the Spearman rho between the copy task's probe importance
and the induction scores, and the ablation results; everything lands in ``--out``.

    python bench/bench_attribution.py --out runs/attribution-bench --tasks capitals,repeat_tokens
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.models import DEFAULT_MODEL, load_model
from headprobe.extract.tasks import get_task
from headprobe.probes.attribution import AttributionConfig, attribute, write_attribution
from headprobe.probes.checkpoint import save_checkpoint
from headprobe.probes.checks.head_scores import head_type_scores, rank_agreement
from headprobe.probes.linear import LinearProbes
from headprobe.probes.sparse import SparseProbe
from headprobe.train.data import StoreDataModule


def fit(module: L.LightningModule, store: Path, epochs: int) -> L.LightningModule:
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu").fit(
        module, datamodule=StoreDataModule(str(store)))
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/attribution-bench"))
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tasks", default="capitals,repeat_tokens")
    p.add_argument("--copy-task", default="repeat_tokens")
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--ablate", type=int, default=8)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    loaded = load_model(args.model)

    t0 = time.perf_counter()
    scores = head_type_scores(loaded.model)
    print(f"attention-pattern scores of {scores['induction'].size} heads in {time.perf_counter() - t0:.1f} s")
    for name, s in scores.items():
        top = np.argsort(-s, axis=None)[:8]
        print(f"  top {name}: " + ", ".join(f"L{i // s.shape[1]}.H{i % s.shape[1]} {s.flat[i]:.2f}" for i in top))

    rows = {}
    for name in args.tasks.split(","):
        t0 = time.perf_counter()
        store = extract(loaded, get_task(name), args.out / "stores" / f"{name}.h5",
                        ExtractConfig(max_examples=args.max_examples), resume=True, progress=False)
        t1 = time.perf_counter()
        probes = fit(LinearProbes(controls=["shuffled"]), store, epochs=30)
        save_checkpoint(args.out / "ckpt" / f"linear-{name}", probes.checkpoint_tensors(), probes.checkpoint_config(),
                        probes.checkpoint_metrics())
        sparse = fit(SparseProbe(penalty="group_lasso", alpha=0.05, inner_steps=100), store, epochs=10)
        save_checkpoint(args.out / "ckpt" / f"sparse-{name}", sparse.checkpoint_tensors(), sparse.checkpoint_config(),
                        sparse.checkpoint_metrics())
        acc, control = probes.tables["val"]["acc"][0], probes.tables["val"]["acc"][1]
        rows[name] = {"extract_s": t1 - t0, "probe_s": time.perf_counter() - t1, "acc": acc, "sel": acc - control}
        print(f"{name}: extracted in {t1 - t0:.0f} s, probes in {rows[name]['probe_s']:.0f} s; best head val acc "
              f"{acc.max():.3f}, shuffled-control mean {control.mean():.3f}")

    if args.copy_task in rows:
        r = rows[args.copy_task]
        summary = {f"{imp}_vs_{t}": rank_agreement(r[imp], scores[t]) for imp in ("acc", "sel")
                   for t in ("induction", "duplicate_token", "previous_token")}
        print(f"Spearman rho over {r['acc'].size} heads, {args.copy_task} probe importance vs pattern scores:")
        for k, v in summary.items():
            print(f"  {k}: {v:.3f}")
        (args.out / "spearman.json").parent.mkdir(parents=True, exist_ok=True)
        (args.out / "spearman.json").write_text(json.dumps(summary, indent=1) + "\n")

    t0 = time.perf_counter()
    config = AttributionConfig(head_scores=True, ablate=args.ablate, draws=args.draws, examples=args.examples)
    result = attribute([args.out / "ckpt", args.out / "stores"], config=config)
    write_attribution(result, args.out / "attribution", overwrite=True)
    print(f"attribute: {time.perf_counter() - t0:.0f} s; report in {args.out / 'attribution' / 'report.md'}")


if __name__ == "__main__":
    main()
