"""How often the ablation check's "top hurts more" fires when the top heads are no different from others.

The verdict is "the top-k result lies below the 95% prediction interval of one random draw". Under the null (the top
set is one more draw from the random sets' distribution) it should fire ~2.5% of the time whatever the number of
draws. Two simulations, as in ``headprobe run``'s ablation check:

1. Gaussian draws: the top set's metric and the random draws' are i.i.d. normal; the rule against the mean's CI is
   printed beside it (it narrows with more draws, so it fires far more often).
2. Heads whose ablation harms add up, differ by layer (early layers hurt more) and are heavy-tailed within a layer,
   with the top set drawn like the layer-matched controls: the layer-matched control should fire at ~2.5%, while
   random heads from all layers fire far more often when the top heads share a few layers.

    python bench/bench_calibration.py            # ~1 min on 2 cores; prints the rates
"""
from __future__ import annotations

import argparse

import numpy as np

from headprobe.probes.checks.ablation import AblationResult, draw_random_heads, t_interval


def gaussian_rates(n_draws: int, n_sims: int, rng: np.random.Generator) -> tuple[float, float]:
    """(rate of "top hurts more", rate of "top below the mean's 95% CI") under i.i.d. normal draws."""
    fired, below_ci = [], []
    for _ in range(n_sims):
        values = rng.normal(size=n_draws + 1)
        rv = values[1:]
        res = AblationResult(2, "mean", 0.0, float(values[0]), (0.0, 0.0), rv.tolist(), float(rv.mean()),
                             t_interval(rv, False), t_interval(rv, True), [], [])
        fired.append(res.hurts_more)
        below_ci.append(values[0] < t_interval(rv, False)[0])
    return float(np.mean(fired)), float(np.mean(below_ci))


def layered_rates(per_layer: list[int], n_draws: int, n_sims: int, rng: np.random.Generator) -> dict[str, float]:
    """Rates of "top hurts more" per pool when harms differ by layer and the top set is like its layers' heads."""
    L, H, k = 30, 9, 8
    fired = {"all": [], "layers": []}
    for _ in range(n_sims):
        harm = np.exp(rng.normal(0, 1, L))[:, None] * np.linspace(3, 0.5, L)[:, None] * np.exp(rng.normal(0, 1, (L, H)))
        layers = rng.choice(L, len(per_layer), replace=False)
        top = [(int(l), int(h)) for l, c in zip(layers, per_layer) for h in rng.choice(H, c, replace=False)]
        metric = lambda heads: -sum(harm[l, h] for l, h in heads)  # noqa: E731
        for pool in fired:
            rv = np.array([metric(draw_random_heads(top, L, H, pool, rng)) for _ in range(n_draws)])
            res = AblationResult(k, "mean", 0.0, metric(top), (0.0, 0.0), rv.tolist(), float(rv.mean()),
                                 t_interval(rv), t_interval(rv, True), top, [], pool)
            fired[pool].append(res.hurts_more)
    return {pool: float(np.mean(v)) for pool, v in fired.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sims", type=int, default=4000, help="simulations per setting (the layered ones use a third)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print("Gaussian draws: 'top hurts more' (goal ~0.025) | top below the mean's CI")
    for n in (5, 10, 30):
        fired, below = gaussian_rates(n, args.sims, rng)
        print(f"  {n:>2} draws: {fired:.4f} | {below:.4f}")
    print("Layer-dependent harms, top heads per layer: layer-matched (goal ~0.025) | all layers")
    for per_layer in ([4, 4], [6, 2], [3, 3, 2], [1] * 8):
        for n in (5, 10):
            rate = layered_rates(per_layer, n, args.sims // 3, np.random.default_rng(len(per_layer)))
            print(f"  {str(per_layer):<26} {n:>2} draws: {rate['layers']:.4f} | {rate['all']:.4f}")


if __name__ == "__main__":
    main()
