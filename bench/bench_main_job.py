"""The main job's steps against their floors, in one run.

Runs the main job (:func:`headprobe.train.pipeline.run`) in this process, on a run YAML (``--config``, as
``headprobe run --config`` takes; ``--quick``: the quick run's), counting the tokens each step pushes
through the model (the batch x sequence shape of every call of its first block, padding included). After the run it times a plain
``model(input_ids)`` forward (no hooks, no cache, random token ids) of each step's most common shapes and scales
that to the step's tokens: the step's *floor*, what its model work alone would cost. Prints each step's time, its
floor and their ratio, and the run's total against the sum of the floors; writes the same as JSON with ``--json``.

    python bench/bench_main_job.py --quick --out /tmp/bench-quick
    python bench/bench_main_job.py --json bench/results/main_job.json --out /tmp/bench-default

Training steps push no tokens through the model: their floor is shown as "-" and they count in the total only.
A fully cached run has nothing to measure: give a fresh ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import yaml

import headprobe.extract.models as models
from headprobe.probes.checks.replay import decoder_blocks
from headprobe.train.fit import CONFIGS
from headprobe.train.pipeline import Steps, run, run_config

SHAPES_TIMED = 12  # per step: the most common shapes, timed once each; the others take their per-token cost


class TokenCounter:
    """Counts the (batch, sequence) shapes of every forward of the models loaded while it is installed, per step."""

    def __init__(self) -> None:
        self.step = "load"
        self.shapes: dict[str, Counter] = defaultdict(Counter)
        self.models: list[torch.nn.Module] = []
        self.handles: list = []

    def hook(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # the first block's input (batch, seq, d_model)
        self.shapes[self.step][tuple(hidden.shape[:2])] += 1

    def install(self) -> None:
        load = models.load_model

        def counted(*args, **kwargs):
            loaded = load(*args, **kwargs)
            self.handles.append(decoder_blocks(loaded.model)[0].register_forward_pre_hook(self.hook, with_kwargs=True))
            self.models.append(loaded.model)
            return loaded

        models.load_model = counted
        call = Steps.__call__

        def step(steps, name, key, fn):
            self.step = name
            return call(steps, name, key, fn)

        Steps.__call__ = step


def floor_seconds(model: torch.nn.Module, shapes: Counter) -> float:
    """Plain-forward seconds of every call in ``shapes`` ({(batch, seq): calls}): the most common shapes timed,
    the rest at the timed shapes' mean cost per token."""
    timed_tokens, timed_seconds = 0, 0.0
    vocab = model.config.vocab_size
    for shape, calls in shapes.most_common(SHAPES_TIMED):
        ids = torch.randint(0, vocab, shape)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # warm-up
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            seconds = time.perf_counter() - start
        timed_tokens += calls * ids.numel()
        timed_seconds += calls * seconds
    all_tokens = sum(calls * shape[0] * shape[-1] for shape, calls in shapes.items())
    return timed_seconds / max(timed_tokens, 1) * all_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--config", type=Path, help="a run YAML (default: the default run)")
    p.add_argument("--quick", action="store_true", help="the quick run's YAML (train/configs/run_quick.yaml)")
    p.add_argument("--out", type=Path, required=True, help="the run folder (a fresh one: cached steps have no cost)")
    args = p.parse_args()
    path = CONFIGS / "run_quick.yaml" if args.quick else args.config
    settings = yaml.safe_load(path.read_text()) if path else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    counter = TokenCounter()
    counter.install()
    start = time.perf_counter()
    result = run(run_config({**settings, "out": str(args.out), "progress": False}))
    total = time.perf_counter() - start
    for handle in counter.handles:
        handle.remove()
    rows = []
    for record in result.steps:
        shapes = counter.shapes.get(record.name)
        floor = floor_seconds(counter.models[0], shapes) if shapes and record.status == "ran" else None
        tokens = sum(c * s[0] * s[-1] for s, c in shapes.items()) if shapes else 0
        rows.append({"step": record.name, "status": record.status, "seconds": round(record.seconds, 1),
                     "tokens": tokens, "floor_seconds": None if floor is None else round(floor, 1),
                     "ratio": None if not floor else round(record.seconds / floor, 2)})
    floors = sum(r["floor_seconds"] or 0 for r in rows)
    width = max(len(r["step"]) for r in rows) + 2
    print(f"{'step':<{width}}{'status':<8}{'seconds':>9}{'tokens':>11}{'floor s':>9}{'x floor':>9}")
    for r in rows:
        floor = "-" if r["floor_seconds"] is None else f"{r['floor_seconds']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['step']:<{width}}{r['status']:<8}{r['seconds']:>9.1f}{r['tokens']:>11}{floor:>9}{ratio:>9}")
    print(f"total {total:.1f} s (model load included) against a sum of floors of {floors:.1f} s: "
          f"{total / max(floors, 1e-9):.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": str(path or "default"), "total_seconds": round(total, 1),
                                         "floor_seconds": round(floors, 1), "steps": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
