"""Training-free scores on the default model: each score's time, its top heads with their stage, the retrieval
task's accuracy, and the scores' agreement with the shipped probes (checkpoints/v1).

    python bench/bench_scores.py --scores negative,copying,successor,induction --out bench/results/scores
    python bench/bench_scores.py --scores retrieval --lengths 256,512,1024 --out bench/results/scores-retrieval

Writes the scores' files (scores.csv, scores.json, score_<name>.png) and ``report.md`` (the scores' section; the
"stage in the map" of each top head is that of the stage map of the shipped linear and sparse probes alone, so that
it says what the probes think of the heads the scores find) into --out, and prints the figures, with how many heads
change their dominant stage when the pooled scores join that map. Run it on an idle machine with one torch thread for timings comparable with the pipeline's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from headprobe.extract.models import DEFAULT_MODEL, load_model
from headprobe.extract.shipped import shipped_folder
from headprobe.probes.attribution.api import evidence_from_checkpoints
from headprobe.probes.attribution.stage_map import build_stage_map
from headprobe.probes.checks.head_scores import rank_agreement, top_overlap
from headprobe.probes.checks.scores import POOLED, ScoreConfig, compute_scores
from headprobe.probes.checks.scores_report import scores_section, write_scores


def shipped_probe_evidence() -> list:
    """Evidence of the shipped linear and sparse probes (SAEs need labelled stores: left out)."""
    folders = sorted(p for p in (shipped_folder("checkpoints") / "v1").iterdir()
                     if p.name.endswith(("-linear", "-sparse")))
    return evidence_from_checkpoints(folders)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scores", default="retrieval,negative,copying,successor,induction")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--needles", type=int, default=4)
    p.add_argument("--questions", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    print(f"load: {time.perf_counter() - start:.1f} s")
    cfg = ScoreConfig(args.scores.split(","), lengths=[int(v) for v in args.lengths.split(",")],
                      depths=[float(v) for v in args.depths.split(",")], needles=args.needles,
                      questions=args.questions, batch_size=args.batch_size)
    result = compute_scores(loaded, cfg)
    print("seconds:", json.dumps(result.seconds))
    probes = shipped_probe_evidence()
    pooled = [ev for ev in result.evidence if ev.extra["score"] in POOLED]
    stage_map = build_stage_map(probes + pooled)
    before = build_stage_map(probes)
    changed = int((before.dominant != stage_map.dominant).sum())
    print(f"stage map (shipped linear + sparse probes): {len(before.assigned())} heads with a stage; with the pooled "
          f"scores {len(stage_map.assigned())}; {changed} heads change their dominant stage")
    write_scores(result.evidence, args.out, {k: v for k, v in result.to_json().items() if k != "evidence"})
    (args.out / "report.md").write_text(scores_section(result.evidence, before, probes, args.out) + "\n")
    for ev in result.evidence:
        s = np.nan_to_num(ev.score, nan=-np.inf)
        top = np.argsort(-s, axis=None, kind="stable")[:10]
        heads = [f"L{i // s.shape[1]}.H{i % s.shape[1]} {ev.score.flat[i]:.3f}" for i in top]
        print(f"{ev.extra['score']} ({ev.stage}, null {np.nanmedian(ev.null):.3f}, above {(ev.score > ev.null).sum()}):"
              f" {', '.join(heads)}")
    copy_task = [ev for ev in probes if ev.task == "repeat_tokens"]
    for ev in copy_task:
        for sc in result.evidence:
            print(f"agreement {ev.task}/{ev.source} vs {sc.extra['score']}: rho "
                  f"{rank_agreement(ev.score, sc.score[ev.layers]):.2f}, top-8 shared "
                  f"{top_overlap(ev.score, sc.score[ev.layers], 8)}")
    for ev in result.evidence:
        if "accuracy" in ev.extra.get("details", {}):
            print("retrieval accuracy:", json.dumps({k: v for k, v in ev.extra["details"]["accuracy"].items()
                                                     if k != "by_length_depth"}))
        if "answers" in ev.extra.get("details", {}):
            print("binary answers:", json.dumps(ev.extra["details"]["answers"]))


if __name__ == "__main__":
    main()
