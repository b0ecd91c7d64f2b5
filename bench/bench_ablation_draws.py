"""How stable is the ablation check's verdict with few random draws?

``headprobe run`` compares each task's top-k heads with 10 random draws per control (``ablation_draws``; 5 before
this script showed how often 5 draws miss). This script
reads a run's ``attribution/ablation.json`` (the top heads, k, mode and examples), draws ``--draws`` new random sets
per control with another seed, and prints per task and control: the verdict with all draws, the top set's rank
among them, and the share of the ``--subset``-draw subsets whose verdict is "top hurts more", i.e. how often a run
with that many draws would say yes.

    python bench/bench_ablation_draws.py --run runs/default                  # four tasks, ~11 min on 2 cores
    python bench/bench_ablation_draws.py --run runs/default --tasks ioi --draws 40
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import zlib
from pathlib import Path

import numpy as np

from headprobe.extract.models import load_model
from headprobe.extract.tasks import get_task
from headprobe.probes.attribution.kinds.ablation import POOLS, ablation_metric
from headprobe.probes.checks.ablation import causal_checks, t_interval


def share_yes(top: float, values: np.ndarray, subset: int, rng: np.random.Generator, most: int = 20_000) -> float:
    """Share of ``subset``-sized subsets of ``values`` whose one-draw prediction interval lies above ``top``."""
    n = len(values)
    if math.comb(n, subset) <= most:
        subsets = np.array(list(itertools.combinations(range(n), subset)))
    else:
        subsets = np.argsort(rng.random((most, n)), axis=1)[:, :subset]
    return float(np.mean([top < t_interval(values[s], True)[0] for s in subsets]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/default"), help="a headprobe run folder")
    p.add_argument("--tasks", default="greater_than,ioi,repeat_tokens,sentiment")
    p.add_argument("--draws", type=int, default=20, help="new random draws per control")
    p.add_argument("--subset", type=int, default=5, help="draws per run whose verdicts are counted")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=1, help="added to each task's seed (the run used 0)")
    args = p.parse_args()
    saved = json.loads((args.run / "attribution" / "ablation.json").read_text())
    loaded = load_model(args.model)
    rng, rows = np.random.default_rng(0), {}
    print(f"{'task':<14} {'control':<14} {'top':>8} {'draws: mean':>12} {'one-draw 95% PI':>20} {'yes':>4} "
          f"{'rank':>6} {f'yes in {args.subset}-draw runs':>22}")
    for name in args.tasks.split(","):
        r, t0 = saved[name], time.perf_counter()
        option = "accuracy" if r["metric"] == "metric" else "auto"  # what the run passed as --metric
        _, key, metric, means = ablation_metric(loaded, get_task(name), r["n_examples"], r["mode"], option)
        checks = causal_checks(loaded.model, metric, [tuple(h) for h in r["top_heads"]], args.draws, r["mode"],
                               means, seed=zlib.crc32(name.encode()) + args.seed)
        for pool, res in checks.items():
            values = np.asarray(res.random)
            row = {"top": res.top, "random": res.random, "random_pi": res.random_pi, "hurts_more": res.hurts_more,
                   "rank": int((values <= res.top).sum()) + 1,
                   "share_yes": share_yes(res.top, values, args.subset, rng)}
            rows[f"{name}/{pool}"] = row
            print(f"{name:<14} {POOLS[pool]:<14} {res.top:>8.3f} {res.random_mean:>12.3f} "
                  f"{f'[{res.random_pi[0]:.3f}, {res.random_pi[1]:.3f}]':>20} {'yes' if res.hurts_more else 'no':>4} "
                  f"{row['rank']:>3}/{len(values) + 1:<2} {row['share_yes']:>22.2f}")
        print(f"  ({name}: {key}, {time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path("bench/results/ablation_draws.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
