"""What does the steering check cost on a model, and what does the hook add to a forward pass?

Times one measurement of the sweep (the task's behaviour metric on ``--examples`` examples, and CE and KL on
``--corpus_tokens`` corpus tokens), clean and steered (8 heads at every position), and projects the cost of the
steering evidence kind (``probes/attribution/kinds/steer.py``: its alphas times the probe and both controls' draws)
for one task and for every steerable built-in task. CPU user time is printed too: on a shared machine wall time
says more about the neighbours than about the code.

    python bench/bench_steer.py                                   # sentiment on the default model
    python bench/bench_steer.py --task capitals --examples 64 --corpus_tokens 1024
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from headprobe.extract.hooks import head_layout
from headprobe.extract.models import DEFAULT_MODEL, load_model
from headprobe.extract.tasks import TASKS
from headprobe.probes.attribution.kinds import steer as kind
from headprobe.probes.checks.steer import SideEffects, behaviour, corpus_sequences
from headprobe.probes.steering import HeadSteering, shift_table


def clock() -> tuple[float, float]:
    return time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime


def timed(fn, repeats: int) -> tuple[float, float]:
    """Mean (wall, user CPU) seconds of ``fn()``."""
    wall, user = clock()
    for _ in range(repeats):
        fn()
    w, u = clock()
    return (w - wall) / repeats, (u - user) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--corpus_tokens", type=int, default=kind.CORPUS_TOKENS)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded, task = load_model(args.model), TASKS[args.task]
    examples = task.examples(0)
    examples = [examples[i] for i in np.sort(np.random.default_rng(0).choice(len(examples), args.examples, False))]
    what = behaviour(loaded, task, examples)
    side = SideEffects(loaded.model, corpus_sequences(loaded.tokenizer, args.corpus_tokens))
    layout = head_layout(loaded.model)
    heads = [(layout.n_layers - 1 - i, i % layout.n_heads) for i in range(8)]
    shift = shift_table(layout.n_layers, layout.n_heads, heads, torch.randn(8, layout.d_head))
    measure = lambda: (what.measure(), side.measure())  # noqa: E731
    clean = timed(measure, args.repeats)
    with HeadSteering(loaded.model, shift):
        steered = timed(measure, args.repeats)
    per_task = sum(a != 0 for a in kind.ALPHAS) * (1 + 2 * kind.DRAWS)
    steerable = [t for t in TASKS.values() if t.metric == "choice" and len(t.label_names) == 2]
    print(f"{args.model}, {args.task}: {args.examples} examples, {side.n_tokens} corpus tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"one measurement: clean {clean[0]:.2f} s wall ({clean[1]:.2f} s CPU), steered {steered[0]:.2f} s wall "
          f"({steered[1]:.2f} s CPU): the hook adds {100 * (steered[1] / clean[1] - 1):+.1f}% CPU")
    n = len(steerable)
    print(f"the steering kind: {per_task} measurements per task ~ {per_task * steered[0] / 60:.1f} min wall "
          f"({per_task * steered[1] / 60:.1f} min CPU); the {n} steerable built-in tasks at this task's cost ~ "
          f"{n * per_task * steered[0] / 60:.1f} min wall ({n * per_task * steered[1] / 60:.1f} min CPU)")


if __name__ == "__main__":
    main()
