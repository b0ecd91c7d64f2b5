"""The ablation check with and without replaying the clean run's prefix, on the default model, in one run.

Each ablated run of the check replays the decoder blocks below its first ablated layer from the clean run
(:class:`headprobe.probes.checks.replay.PrefixReplay`). This script times :func:`causal_checks` on a task's metric
both ways, checks that the numbers are the same, and prints the ratio.

    python bench/bench_ablation_replay.py --task ioi --heads 14.4,15.1,16.0,17.7,18.2,19.5,20.3,21.1
    python bench/bench_ablation_replay.py --task capitals --draws 10 --examples 64

The default heads are mid-to-late heads of SmolLM2-135M-Instruct (30 layers x 9), like the top heads the default
run ablates; a random draw from all layers starts lower, so its saving is smaller.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from headprobe.extract.models import DEFAULT_MODEL, load_model
from headprobe.extract.tasks import get_task
from headprobe.probes.attribution.kinds.ablation import ablation_metric
from headprobe.probes.checks.ablation import causal_checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default="ioi")
    p.add_argument("--heads", default="14.4,15.1,16.0,17.7,18.2,19.5,20.3,21.1", help="LAYER.HEAD,...")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    heads = [tuple(int(v) for v in h.split(".")) for h in args.heads.split(",")]
    _, key, metric, means = ablation_metric(loaded, get_task(args.task), args.examples, "mean")
    results, seconds = {}, {}
    for replay in (False, True):
        start = time.perf_counter()
        results[replay] = causal_checks(loaded.model, metric, heads, n_draws=args.draws, means=means, replay=replay)
        seconds[replay] = time.perf_counter() - start
    same = all(np.allclose(results[True][p].random, results[False][p].random, rtol=1e-6, atol=1e-7)
               and np.isclose(results[True][p].top, results[False][p].top, rtol=1e-6, atol=1e-7)
               for p in results[True])
    runs = 2 + 2 * args.draws
    print(f"{args.task} ({key}), {len(heads)} heads, {runs} metric runs on {args.examples} examples, "
          f"{args.threads} thread(s)")
    print(f"recompute every block: {seconds[False]:.1f} s; replay the clean prefix: {seconds[True]:.1f} s; "
          f"speed-up {seconds[False] / seconds[True]:.2f}x; same numbers (rtol 1e-6): {same}")


if __name__ == "__main__":
    main()
