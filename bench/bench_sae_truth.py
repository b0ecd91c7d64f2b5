"""Benchmark: do SAEs find the true features? headprobe's architectures and the anchors on ground-truth worlds.

Two worlds from probes/synthetic.py (``synthsae``: Zipfian firing, trees with exclusive siblings, low-rank
correlated firing, superposition; ``independent``: the same without trees and correlation). Every trainer gets the
same training rows (a pool drawn once, reused for budgets above it) and is scored on the same held-out rows:
MCC, uniqueness, precision, recall, F1, true features found at |cos| > 0.9, held-out FVE, L0, latents silent on
held-out rows, tokens/s of the whole fit. The architectures named in ``--consistency`` also train a second seed: the
pair's MCC, and how well a latent's consistency (best |cos| to the other seed) predicts that it is a true feature
(Spearman over latents; precision and recall of "consistency > 0.9" as a detector of "best |cos| to a true
feature > 0.9").

    python bench/bench_sae_truth.py                                      # headprobe only, full size
    python bench/bench_sae_truth.py --sparsify-path /tmp/sparsify_pkgs

The anchor is a bench-only extra, never a headprobe dependency: EleutherAI sparsify (pip install --no-deps --target
DIR eai-sparsify==1.3.3 einops natsort simple-parsing schedulefree). SAELens is not wired in yet. Timings on a
shared machine are noisy: compare one run's rows.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from bench_sae import train_headprobe, train_sparsify
from headprobe.probes.sae_eval import ReconstructionStats
from headprobe.probes.sae_truth import consistency_vs_truth, seed_consistency, truth_scores
from headprobe.probes.synthetic import independent_config, make_world, synthsae_config, world_summary

warnings.filterwarnings("ignore", ".*does not have many workers.*")
WORLDS = {"synthsae": synthsae_config, "independent": independent_config}


def held_out_scores(name: str, W: torch.Tensor, encode, decode, x: torch.Tensor, crow, feature, world,
                    tokens: int, seconds: float) -> tuple[dict, torch.Tensor]:
    """One table row: recovery against the world's truth and reconstruction on held-out rows x (N, d)."""
    stats, codes = ReconstructionStats(len(W)), []
    with torch.no_grad():
        for s in range(0, len(x), 4096):
            f = encode(x[s:s + 4096])
            stats.update(x[s:s + 4096], decode(f), f)
            codes.append(f)
    m = stats.compute()
    t = truth_scores(W.detach().float(), world.directions, torch.cat(codes), crow, feature)
    row = {"trainer": name, "tokens": tokens, **{k: round(v, 4) for k, v in t.row().items()},
           "fve": round(m["fve"], 4), "l0": round(m["l0"], 2), "silent": round(m["dead_frac"], 4),
           "tokens_per_s": round(tokens / seconds), "seconds": round(seconds, 1)}
    print(json.dumps(row), flush=True)
    return row, t.latent_cos


def run_headprobe(arch: str, seed: int, pool: np.ndarray, tokens: int, args, truth) -> tuple[dict, object, torch.Tensor]:
    config = {"batchtopk": {"architecture": "batchtopk"}, "matryoshka": {"architecture": "matryoshka"}}.get(arch, {})
    sae, sec = train_headprobe(pool, tokens, args.d_sae, args.k, args.batch, seed, **config)
    name = f"headprobe {arch}" + (f" seed {seed}" if seed != args.seed else "")
    row, latent_cos = held_out_scores(name, sae.W_dec, sae.encode, sae.decode, *truth, int(sae.tokens_seen), sec)
    return row, sae, latent_cos


def run_sparsify(pool: np.ndarray, tokens: int, args, truth) -> dict:
    sae, sec = train_sparsify(pool, tokens, args.d_sae, args.k, args.batch, args.seed, args.sparsify_path)

    def encode(x):
        out = sae.encode(x)
        return torch.zeros(len(x), sae.num_latents).scatter_(1, out.top_indices, out.top_acts)

    decode = lambda f: f @ sae.W_dec + sae.b_dec
    return held_out_scores("sparsify 1.3.3", sae.W_dec, encode, decode, *truth, (tokens // 256) * 256, sec)[0]


def world_rows(name: str, args) -> tuple[object, np.ndarray, tuple]:
    trees = {"n_roots": max(1, args.features // 128)} if name == "synthsae" else {}  # 32 at 4,096 features
    cfg = WORLDS[name](n_features=args.features, d=args.d, true_l0=args.l0, **trees)
    world = make_world(cfg)
    summary = world_summary(world)
    print(json.dumps({"world": name, **{k: summary[k] for k in ("n_features", "d", "true_l0", "n_roots",
                                                                "corr_rank", "measured_mean_max_cos")}}), flush=True)
    pool = world.sample(min(args.pool, max(args.tokens)), seed=1)[0].numpy()
    x, crow, feature, _ = world.sample(args.heldout, seed=2)
    return world, pool, (x, crow, feature, world)


def consistency_row(arch: str, sae, latent_cos, pool, tokens, args, truth) -> dict:
    other = run_headprobe(arch, args.seed + 1, pool, tokens, args, truth)[1]
    c = seed_consistency(sae.W_dec.detach(), other.W_dec.detach())
    row = {"consistency": f"headprobe {arch}", "tokens": tokens, "pair_mcc": round(c.mcc, 4),
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in consistency_vs_truth(c.a, latent_cos).items()}}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="synthsae,independent")
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--l0", type=float, default=16.0, help="true L0 of the worlds")
    p.add_argument("--d-sae", type=int, default=0, help="latents (0: as many as true features)")
    p.add_argument("--k", type=int, default=0, help="active latents (0: the true L0)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", default="1200000,5000000", help="training budgets, comma-separated")
    p.add_argument("--pool", type=int, default=1_200_000, help="distinct training rows (reused above it)")
    p.add_argument("--heldout", type=int, default=16384)
    p.add_argument("--archs", default="topk,batchtopk,matryoshka")
    p.add_argument("--consistency", default="topk", help="architectures that also train a second seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsify-path", default=None, help="folder where eai-sparsify was pip-installed (--target)")
    p.add_argument("--out", type=Path, default=Path("bench/results/sae_truth.json"))
    args = p.parse_args(argv)
    args.d_sae, args.k = args.d_sae or args.features, args.k or round(args.l0)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    torch.set_num_threads(args.threads)
    results = []
    for name in args.worlds.split(","):
        world, pool, truth = world_rows(name, args)
        for tokens in args.tokens:
            rows = []
            for arch in filter(None, args.archs.split(",")):
                row, sae, latent_cos = run_headprobe(arch, args.seed, pool, tokens, args, truth)
                rows.append(row)
                if arch in args.consistency.split(","):
                    rows.append(consistency_row(arch, sae, latent_cos, pool, tokens, args, truth))
            if args.sparsify_path:
                rows.append(run_sparsify(pool, tokens, args, truth))
            results.append({"world": name, "tokens": tokens, "rows": rows})
            print_table(name, tokens, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results},
                                   indent=1, default=str) + "\n")


def print_table(world: str, tokens: int, rows: list[dict]) -> None:
    print(f"\n{world} world, {tokens:,} tokens\n\n| trainer | MCC | uniq | prec | recall | F1 | found | FVE | L0 | "
          f"silent | tok/s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "trainer" in r:
            print(f"| {r['trainer']} | {r['mcc']:.3f} | {r['uniqueness']:.3f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['f1']:.3f} | {r['found']} | {r['fve']:.3f} | {r['l0']:.1f} | "
                  f"{r['silent']:.1%} | {r['tokens_per_s']:,} |")
    for r in rows:
        if "consistency" in r:
            print(f"\n{r['consistency']} two seeds: pair MCC {r['pair_mcc']:.3f}; consistency vs truth: Spearman "
                  f"{r['spearman']:.3f}, 'consistency > 0.9' flags {r['flagged']} latents, precision "
                  f"{r['precision']:.3f}, recall {r['recall']:.3f} of the {r['true']} true-feature latents")
    print(flush=True)


if __name__ == "__main__":
    main()
