"""``headprobe scores``: training-free head scores of a model, alone (no probes, no checkpoints).

    headprobe scores --out scores                                   # the default model, the default scores
    headprobe scores --model smollm2-135m --scores retrieval,negative,copying,successor,induction --out scores

A thin wrapper over :func:`headprobe.probes.checks.scores.compute_scores` and
:func:`headprobe.probes.checks.scores_report.write_scores`. Writes into ``--out``: ``scores.csv`` (one row per head:
each score and its null), ``scores.json`` (the scores, nulls, stages, the retrieval task's accuracy, the model's
answers to the binary questions, each score's seconds) and ``score_<name>.png`` (a layer x head heatmap per score),
plus ``scores.md`` (the report section). Nothing is written before every score is computed.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from headprobe import InputError
from headprobe.train.options import add_flag, kebab_aliases, level

OUTPUTS = ("scores.csv", "scores.json", "scores.md")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated token counts, such as 256,512,1024") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated token counts, such as 256,512,1024")
    return values


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated depths between 0 and 1, such as 0.1,0.5,0.9")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from headprobe.extract.models import DEFAULT_MODEL
    from headprobe.probes.checks.scores import DEFAULT_SCORES, STAGE

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model alias, folder, .gguf file or hub id "
                                                           f"(default {DEFAULT_MODEL})")
    p.add_argument("--scores", type=lambda t: [s.strip() for s in t.split(",") if s.strip()],
                   default=list(DEFAULT_SCORES), help=f"comma-separated scores from {', '.join(STAGE)} "
                                                      f"(default {','.join(DEFAULT_SCORES)})")
    p.add_argument("--out", type=Path, required=True, help="folder for scores.csv, scores.json and the heatmaps")
    p.add_argument("--alpha", type=level, default=0.01, help="family-wise level of the nulls (Bonferroni over heads)")
    p.add_argument("--lengths", type=_ints, default=[256, 512, 1024], help="needle prompt lengths in tokens")
    p.add_argument("--depths", type=_depths, default=[0.1, 0.5, 0.9], help="needle depths (0: start, 1: end)")
    p.add_argument("--needles", type=int, default=4, help="how many of the shipped needles to hide")
    p.add_argument("--retrieval", choices=["generate", "teacher"], default="generate",
                   help="retrieval evidence: generate (the paper's: greedy answers, answered prompts only) or "
                        "teacher (teacher-forced answers, every prompt)")
    p.add_argument("--questions", type=int, default=128, help="binary questions for the negative score")
    p.add_argument(*kebab_aliases("--batch_size"), type=int, default=4, help="prompts per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    add_flag(p, "--overwrite", "replace the scores in an --out that holds some")


def earlier_outputs(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, or holds scores unless ``overwrite`` (before any work)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder")
    old = [name for name in OUTPUTS if (out / name).exists()]
    if old and not overwrite:
        raise InputError(f"--out {out} holds scores ({old[0]}): pass --overwrite to replace them, or another --out")


def run(args: argparse.Namespace) -> None:
    from headprobe.extract.models import load_model
    from headprobe.probes.checks.scores import ScoreConfig, compute_scores
    from headprobe.probes.checks.scores_report import scores_section, write_scores

    earlier_outputs(args.out, args.overwrite)
    config = ScoreConfig(args.scores, args.alpha, args.lengths, args.depths, args.needles, args.retrieval,
                         args.questions, args.batch_size, args.seed)
    result = compute_scores(load_model(args.model, dtype=args.dtype, device=args.device), config)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        for old in args.out.glob("score_*.png"):
            old.unlink()
        paths = write_scores(result.evidence, tmp, {k: v for k, v in result.to_json().items() if k != "evidence"})
        (Path(tmp) / "scores.md").write_text(scores_section(result.evidence, folder=Path(tmp)) + "\n")
        for path in [*paths, Path(tmp) / "scores.md"]:
            shutil.move(str(path), args.out / path.name)
    for ev in result.evidence:
        above = int((ev.score > ev.null).sum())
        print(f"scores: {ev.extra['score']} ({ev.stage}): {above} of {ev.score.size} heads above the null; "
              f"{ev.extra['seconds']} s")
    for name, why in result.skipped.items():
        print(f"scores: {name} skipped: {why}")
    print(f"scores: written to {args.out}")
