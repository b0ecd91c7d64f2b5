"""``headprobe steer``: steer a model along a task's probe directions, sweeping alpha and K against controls.

    headprobe steer --probe v1/capitals-linear --store data/capitals.h5 --out runs/steer-capitals
    headprobe steer --probe runs/sentiment-linear/checkpoint --store data/sentiment.h5 --out steer --k 4 8 \\
        --alphas 0 1 2 5 --save steer/checkpoint --alpha 2

A thin wrapper over :func:`headprobe.probes.checks.steer.steer_sweep` and :func:`.steer_report.write_steer`. Writes
into ``--out``: ``steer.csv`` (every setting and draw), ``steer.json``, ``steer.png`` (effect and side effect
against alpha) and ``steer.md`` (the report section). With ``--save DIR`` also the intervention (the first K, at
``--alpha``) as a checkpoint that ``headprobe.load`` reads, its measured effect in ``metrics.json``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from headprobe import InputError
from headprobe.probes.checks.steer import ALPHAS, steer_sweep
from headprobe.probes.checks.steer_report import FILES, write_steer
from headprobe.probes.steering import DIRECTIONS, POSITIONS
from headprobe.train.options import add_flag, at_least_two, kebab_aliases


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a whole number of 1 or more")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", required=True, help="LinearProbes checkpoint: folder, registry id (v1/capitals-linear) "
                                                  "or hub reference")
    p.add_argument("--store", type=Path, required=True, help="the probe's training store (sigma, held-out examples)")
    p.add_argument("--out", type=Path, required=True, help="folder for steer.csv, steer.json, steer.png, steer.md")
    p.add_argument("--model", default=None, help="the model (default: the probe's model)")
    p.add_argument("--k", type=_positive, nargs="+", default=[8], help="heads to steer (several: a sweep over K)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS), help="strengths to sweep")
    p.add_argument("--direction", choices=DIRECTIONS, default="mass_mean",
                   help="each head's direction: the mass-mean of the classes (ITI) or the probe's weight")
    p.add_argument("--position", choices=POSITIONS, default="all", help="steer every position or the last token")
    p.add_argument("--examples", type=_positive, default=32, help="held-out task examples per measurement")
    p.add_argument("--draws", type=at_least_two, default=4, help="draws of each control (at least 2)")
    p.add_argument(*kebab_aliases("--corpus_tokens"), type=_positive, default=512,
                   help="held-out corpus tokens for the side effect (CE and KL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None, help="also save the intervention (the first --k, at --alpha) "
                                                           "as a checkpoint folder")
    p.add_argument("--alpha", type=float, default=None, help="the saved intervention's strength (swept too)")
    add_flag(p, "--overwrite", "replace a sweep in --out, or an intervention in --save")


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse before any work: an --out that is a file or holds a sweep, a --save that holds anything (without
    --overwrite), --save without --alpha."""
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file: pass a folder")
    old = [name for name in FILES if (args.out / name).exists()]
    if old and not args.overwrite:
        raise InputError(f"--out {args.out} holds a sweep ({old[0]}): pass --overwrite to replace it, or another --out")
    if args.save is not None:
        if args.alpha is None:
            raise InputError("--save needs --alpha: the strength the saved intervention steers with")
        if args.save.exists() and (not args.save.is_dir() or any(args.save.iterdir())) and not args.overwrite:
            raise InputError(f"--save {args.save} is not empty: pass --overwrite to replace it, or another folder")
    elif args.alpha is not None:
        raise InputError("--alpha sets the strength of the intervention --save writes: pass --save DIR too")


def intervention_metrics(result, k: int, alpha: float) -> dict:
    """What the sweep measured for the saved intervention: per metric the change from clean and each control's
    mean, the CE change and KL on corpus text, and the clean values."""
    out = {"k": k, "alpha": alpha, "n_examples": result.n_examples, "n_tokens": result.n_tokens}
    for metric in result.metrics:
        s = result.summary(k, alpha, metric)
        out[f"effect/{metric}"] = s["probe"]
        out[f"clean/{metric}"] = s["clean"]
        for cond in ("random_direction", "random_heads"):
            out[f"{cond}/{metric}"] = s[cond]["mean"]
            out[f"{cond}_pi_high/{metric}"] = s[cond]["pi"][1]
        out[f"beats_both/{metric}"] = s["beats_both"]
    s = result.summary(k, alpha, "margin")
    return {**out, "side/ce_change": s["ce"], "side/kl": s["kl"], "side/ce_clean": result.ce_clean}


def run(args: argparse.Namespace) -> None:
    from headprobe.extract.models import load_model
    from headprobe.extract.store import Store
    from headprobe.probes.hub import load
    from headprobe.probes.steering import build_intervention

    _check_outputs(args)
    alphas = sorted(set(args.alphas) | ({args.alpha} if args.alpha is not None else set()))
    probe = load(args.probe)
    if type(probe).__name__ != "LinearProbes":
        raise InputError(f"--probe {args.probe} holds a {type(probe).__name__}: pass a LinearProbes checkpoint")
    with Store(args.store) as store:
        build_intervention(probe, store, max(args.k), 1.0, args.direction, args.position)  # refuse before loading
        loaded = load_model(args.model or probe.checkpoint_config_loaded.model_id)
        result = steer_sweep(loaded, probe, store, tuple(args.k), tuple(alphas), args.direction, args.position,
                             args.examples, args.draws, args.corpus_tokens, args.seed)
        if args.save is not None:
            intervention = build_intervention(probe, store, args.k[0], args.alpha, args.direction, args.position)
    paths = write_steer({result.task: result}, args.out)
    print(f"steer: {result.task}: table {paths['steer.csv']}, plot {paths['steer.png']}, section {paths['steer.md']}")
    if args.save is not None:
        command = shlex.join(["headprobe", "steer", *sys.argv[2:]]) if sys.argv[1:2] == ["steer"] else ""
        config = intervention.checkpoint_config(probe.checkpoint_config_loaded, command)
        intervention.save_pretrained(args.save, config, intervention_metrics(result, args.k[0], args.alpha))
        print(f"steer: saved the intervention (K={args.k[0]}, alpha={args.alpha:g}) to {args.save}")
