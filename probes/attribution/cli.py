"""``headprobe attribute``: trained probes and SAEs -> heads -> reasoning stages, with modeling-free cross-checks.

    headprobe attribute runs/default --out runs/default/attribution
    headprobe attribute ckpt/linear-capitals ckpt/sae-l15 --stores capitals.h5 --out attr --head_scores --ablate 8

A thin wrapper over :func:`headprobe.probes.attribution.attribute` and :func:`.write_attribution`. Writes into
``--out``: ``stage_map.png``, ``stage_scores.csv``, ``stage_map.json``, ``stage_map.md``, ``attribution.json`` and
``report.md``; with ``--head_scores`` also ``head_types.csv`` (attention-pattern scores of every head) and
``induction_check.png``; with ``--ablate K`` ``ablation.json`` and ``ablation.png`` (each task's top-K heads
mean-ablated against K random heads from all layers and layer-matched ones, on the task's model metric and, for
true/false statements, on the last layer's readout of the label).
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from headprobe.probes.attribution.api import AttributionConfig, attribute, earlier_outputs, write_attribution
from headprobe.probes.attribution.stage_map import SCALES
from headprobe.train.options import add_flag, at_least_two, level


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path, help="checkpoint folders, or run folders to search for checkpoints "
                                                        "and stores")
    p.add_argument("--out", type=Path, required=True, help="folder for the stage map and the report")
    p.add_argument("--stores", nargs="*", type=Path, default=[],
                   help="labelled HDF5 stores to tie SAE latents to tasks")
    p.add_argument("--alpha", type=level, default=0.01, help="family-wise level of the nulls (Bonferroni over heads)")
    p.add_argument("--top", type=int, default=8, help="heads listed per stage in the report")
    p.add_argument("--reduce", choices=["mean", "max"], default="mean", help="pooling over a stage's evidence")
    p.add_argument("--scale", choices=SCALES, default="share",
                   help="each evidence's excess over its null divided by its total (share: a head's share of what "
                        "the task found) or by its largest (max: how close a head comes to the task's best head)")
    add_flag(p, "--head_scores", "also score previous-token, duplicate-token and induction heads from attention "
                                 "patterns")
    p.add_argument("--ablate", type=int, default=0, metavar="K", help="ablate each task's top-K heads against K "
                                                                       "random heads (true/false statement tasks "
                                                                       "also on the last layer's readout)")
    p.add_argument("--ablation", choices=["mean", "zero"], default="mean")
    p.add_argument("--draws", type=at_least_two, default=10, help="random-head draws per task (at least 2)")
    p.add_argument("--random_from", "--random-from", choices=["all", "layers", "both"], default="both",
                   help="where the random heads come from: all layers, layer-matched to the top heads "
                        "(as many per layer), or both (two rows)")
    p.add_argument("--examples", type=int, default=64, help="task examples per ablation metric")
    p.add_argument("--metric", choices=["auto", "accuracy"], default="auto",
                   help="ablation metric: auto = the continuous one (choice: log-prob margin of the right answer; "
                        "induction: log-prob of copied tokens), accuracy = the share the model gets right (readout "
                        "rows always use the readout's log-probability)")
    p.add_argument("--scores", nargs="*", default=[], metavar="SCORE", help="training-free head scores to compute "
                   "(retrieval, negative, copying, successor, induction; docs/scores.md)")
    p.add_argument("--pool_scores", "--pool-scores", nargs="*", default=["retrieval", "negative", "successor"],
                   metavar="SCORE", help="which of the scores join the stage map (the others are reported beside it)")
    p.add_argument("--steer", type=int, default=0, metavar="K", help="steer each task's top-K heads along their probe "
                   "directions against random-direction and random-head controls (docs/steering.md; minutes per task)")
    p.add_argument("--model", default=None, help="model for the cross-checks (default: the checkpoints' model)")
    add_flag(p, "--overwrite", "replace the attribution in an --out that holds one")


def run(args: argparse.Namespace) -> None:
    earlier_outputs(args.out, args.overwrite)  # refuse before any work
    config = AttributionConfig(**{f.name: getattr(args, f.name) for f in fields(AttributionConfig)
                                  if hasattr(args, f.name)})
    result = attribute(args.paths, args.stores, args.model, config)
    pooled = result.pooled_evidence
    print(f"attribute: {len(result.checkpoints)} checkpoints, {len(result.stores)} stores: "
          f"{', '.join(f'{e.task}/{e.source}' for e in pooled) or 'no labelled task'}")
    paths = write_attribution(result, args.out, args.overwrite)
    print(f"attribute: {len(result.stage_map.assigned())} heads with a stage; report in {paths['report']}")
