"""Causal check of an attribution: ablate chosen heads during the forward pass and measure a task metric.

A head is ablated by replacing its z (its block of the output projection's input, see :mod:`extract.hooks`) with
its mean over reference inputs (mean ablation) or with zeros (zero ablation), through a forward pre-hook on the
output projection; nothing else in the model changes. :func:`causal_check` compares ablating a task's top-k
attributed heads with ablating k random heads (several draws), with confidence and prediction intervals. The
random heads come from every layer (``pool="all"``), or layer by layer (``pool="layers"``): as many from each of
the top heads' layers as the top set holds there, which asks whether the heads matter more than other heads of
their layers (in small models ablating almost any early-layer head hurts most tasks).
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from scipy import stats
from torch import nn

from headprobe import InputError
from headprobe.extract.hooks import head_layout, out_projections
from headprobe.probes.metrics import bootstrap_ci

Head = tuple[int, int]  # (layer, head)


class HeadAblation:
    """Context manager: while active, the z of ``heads`` is replaced by ``means`` (L, H, D) or by zeros."""

    def __init__(self, model: nn.Module, heads: Iterable[Head], mode: str = "mean", means: torch.Tensor | None = None):
        if mode not in ("mean", "zero"):
            raise InputError(f"ablation mode {mode!r}: choose 'mean' or 'zero'")
        if mode == "mean" and means is None:
            raise InputError("mean ablation needs the heads' means: compute them with head_means(model, batches)")
        self.layout = layout = head_layout(model)
        mask = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.bool)
        for layer, head in heads:
            if not (0 <= layer < layout.n_layers and 0 <= head < layout.n_heads):
                raise InputError(f"head ({layer}, {head}) is outside the model's {layout.n_layers} layers x "
                                 f"{layout.n_heads} heads")
            mask[layer, head] = True
        value = means if mode == "mean" else torch.zeros(layout.n_layers, layout.n_heads, layout.d_head)
        proj = out_projections(model)
        self._handles = [proj[layer].register_forward_pre_hook(self._hook(mask[layer], value[layer]))
                         for layer in torch.nonzero(mask.any(1)).flatten().tolist()]

    def _hook(self, mask: torch.Tensor, value: torch.Tensor):
        H, D = self.layout.n_heads, self.layout.d_head

        def hook(module, args):
            x = args[0]  # (B, S, H * D)
            z = x.view(*x.shape[:-1], H, D)
            z = torch.where(mask.to(x.device)[:, None], value.to(x.device, x.dtype), z)
            return (z.reshape(x.shape), *args[1:])
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "HeadAblation":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def head_means(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Mean z of every head over the non-padding tokens of ``batches`` (model inputs): (L, H, D), float32."""
    layout = head_layout(model)
    total = torch.zeros(layout.n_layers, layout.n_heads * layout.d_head, dtype=torch.float64)
    count = torch.zeros(())
    mask_now: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args):
            x = args[0].double()  # (B, S, H * D)
            total[layer] += (x * mask_now[0][..., None]).sum(dim=(0, 1)).cpu()
        return hook

    handles = [p.register_forward_pre_hook(hook_for(i)) for i, p in enumerate(out_projections(model))]
    try:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask_now[:] = [(torch.ones_like(ids) if mask is None else mask).to(torch.float64)]
            count += mask_now[0].sum().cpu()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise InputError("head_means got no tokens: pass at least one non-empty batch")
    return (total / count).view(layout.n_layers, layout.n_heads, layout.d_head).float()


@dataclass
class AblationResult:
    k: int
    mode: str
    clean: float  # metric without ablation
    top: float  # metric with the top-k heads ablated
    top_ci: tuple[float, float]  # 95% bootstrap CI over examples (a point for a scalar metric)
    random: list[float]  # metric with k random heads ablated, one per draw
    random_mean: float
    random_ci: tuple[float, float]  # 95% t-interval of the mean over draws
    random_pi: tuple[float, float]  # 95% t-prediction interval of one more draw (NaN with fewer than 2 draws)
    top_heads: list[Head]
    random_heads: list[list[Head]]
    pool: str = "all"  # where the random heads come from: "all" layers, or "layers" matched to the top heads

    @property
    def hurts_more(self) -> bool:
        """Ablating the top heads lowers the metric below the range of one random draw (the lower end of its 95%
        prediction interval): under "the top heads are k heads like any others" this happens 2.5% of the time for
        normally spread draws (2-6% with the skewed, layer-dependent harms of ``tests/test_ablation.py``). The
        mean's CI would not do: it narrows with more draws, while a single random draw stays as spread."""
        return bool(self.top < self.random_pi[0])

    def to_dict(self) -> dict:
        return {**asdict(self), "hurts_more": self.hurts_more}


def _mean_ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    lo, hi = bootstrap_ci(values[:, None], seed=seed)  # percentile bootstrap, 95%
    return float(lo[0]), float(hi[0])


def t_interval(values: np.ndarray, one_draw: bool = False) -> tuple[float, float]:
    """95% t-interval of the mean of ``values``, or (``one_draw``) the prediction interval of one more value."""
    n = len(values)
    if n < 2:
        return (float("nan"),) * 2 if one_draw else (float(values.mean()),) * 2
    spread = values.std(ddof=1) * np.sqrt(1 + 1 / n if one_draw else 1 / n)
    half = stats.t.ppf(0.975, n - 1) * spread
    return float(values.mean() - half), float(values.mean() + half)


def draw_random_heads(top_heads: list[Head], n_layers: int, n_heads: int, pool: str,
                      rng: np.random.Generator) -> list[Head]:
    """One random set of as many heads as ``top_heads``, the control that :func:`causal_check` ablates.

    ``pool="all"``: distinct heads drawn from every head of the model but the top ones. ``pool="layers"``: layer
    by layer, as many heads as the top set has in that layer, drawn from all of that layer's heads, the top ones
    included; so if the top heads were no different from the others in their layers, the top set would be one
    more such draw, and the prediction interval of one draw keeps its ~2.5% false-positive rate (leaving the top
    heads out would make the draws overlap each other and understate their spread). A layer whose heads are all
    top heads gives every draw those same heads: that layer cannot tell its heads apart.
    """
    top = list(dict.fromkeys(top_heads))
    if pool == "all":
        taken = set(top)
        others = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in taken]
        if len(others) < len(top):
            raise InputError(f"only {len(others)} heads besides the {len(top)} top heads: ablate fewer top heads")
        return [others[i] for i in sorted(rng.choice(len(others), size=len(top), replace=False))]
    if pool == "layers":
        layers, counts = np.unique(np.array([l for l, _ in top], dtype=int), return_counts=True)
        return [(int(l), int(h)) for l, c in zip(layers, counts)
                for h in sorted(rng.choice(n_heads, size=c, replace=False))]
    raise InputError(f"unknown random-head pool {pool!r}: use 'all' or 'layers'")


def causal_check(model: nn.Module, metric: Callable[[nn.Module], np.ndarray], top_heads: list[Head],
                 n_draws: int = 10, mode: str = "mean", means: torch.Tensor | None = None,
                 seed: int = 0, pool: str = "all") -> AblationResult:
    """Ablate ``top_heads`` and, ``n_draws`` times, as many random heads (see :func:`draw_random_heads`);
    compare the task metric.

    ``metric(model)`` runs the task and returns one value per example, or one scalar (higher = better); it is
    called with the ablation hooks in place. The top heads' CI is a bootstrap over examples (none for a scalar);
    the random draws give the mean's CI and the prediction interval of one draw, which ``hurts_more`` tests.
    """
    return causal_checks(model, metric, top_heads, n_draws, mode, means, seed, (pool,))[pool]


def causal_checks(model: nn.Module, metric: Callable[[nn.Module], np.ndarray], top_heads: list[Head],
                  n_draws: int = 10, mode: str = "mean", means: torch.Tensor | None = None, seed: int = 0,
                  pools: tuple[str, ...] = ("all", "layers"), replay: bool = True) -> dict[str, AblationResult]:
    """:func:`causal_check` against random heads from each of ``pools`` (each with its own random stream from
    ``seed`` and its name); the clean and top-k runs are shared."""
    return causal_checks_by_metric(model, lambda m: {"": metric(m)}, top_heads, n_draws, mode, means, seed,
                                   pools, replay)[""]


def causal_checks_by_metric(model: nn.Module, metrics: Callable[[nn.Module], dict[str, np.ndarray]],
                            top_heads: list[Head], n_draws: int = 10, mode: str = "mean",
                            means: torch.Tensor | None = None, seed: int = 0,
                            pools: tuple[str, ...] = ("all", "layers"),
                            replay: bool = True) -> dict[str, dict[str, AblationResult]]:
    """:func:`causal_checks` for several metrics read off the same forward passes: ``metrics(model)`` returns
    {name: values}; the result is {name: {pool: AblationResult}}. With ``replay`` every ablated run replays the
    clean run's blocks below its first ablated layer (:class:`~headprobe.probes.checks.replay.PrefixReplay`: the
    same numbers, less compute)."""
    from headprobe.probes.checks.replay import PrefixReplay

    layout = head_layout(model)
    _check_draws(top_heads, n_draws, pools, layout)
    prefix = PrefixReplay(model, max_bytes=(2 << 30) if replay else 0)
    with prefix.record():
        clean = {name: float(np.mean(v)) for name, v in metrics(model).items()}

    def ablated(heads: list[Head]) -> dict[str, np.ndarray]:
        with prefix.replay(min(layer for layer, _ in heads)), HeadAblation(model, heads, mode, means):
            return {name: np.atleast_1d(np.asarray(v, dtype=np.float64)) for name, v in metrics(model).items()}

    top = ablated(list(top_heads))
    out: dict[str, dict[str, AblationResult]] = {name: {} for name in clean}
    for pool in pools:
        rng = np.random.default_rng([seed, zlib.crc32(pool.encode())])  # a pool draws the same heads alone or not
        draws = [draw_random_heads(top_heads, layout.n_layers, layout.n_heads, pool, rng) for _ in range(n_draws)]
        values = [ablated(heads) for heads in draws]
        for name in clean:
            rv = np.asarray([float(np.mean(v[name])) for v in values])
            out[name][pool] = AblationResult(len(top_heads), mode, clean[name], float(top[name].mean()),
                                             _mean_ci(top[name], seed), rv.tolist(), float(rv.mean()),
                                             t_interval(rv, False), t_interval(rv, True), list(top_heads), draws,
                                             pool)
    return out


def _check_draws(top_heads: list[Head], n_draws: int, pools: tuple[str, ...], layout) -> None:
    """Refuse a head named twice, fewer than 2 draws, or a pool that cannot be drawn, before any metric runs."""
    if len(set(top_heads)) != len(top_heads):
        raise InputError(f"the top heads {top_heads} name a head twice: pass distinct (layer, head) pairs")
    if n_draws < 2:
        raise InputError(f"{n_draws} random draws give no interval: draw at least 2")
    for pool in pools:
        draw_random_heads(top_heads, layout.n_layers, layout.n_heads, pool, np.random.default_rng(0))


POOL_COLOURS = {"all": "#8c8c8c", "layers": "#3b75af"}


def metric_rows(results: dict[str, dict]) -> list[tuple[str, dict]]:
    """(task, result) per metric of ``results`` (as in ``ablation.json``): each task's model metric, then its
    last-layer readout where it has one (see :mod:`probes.readout`)."""
    return [(task, c) for task, r in results.items() for c in [r, r.get("readout")] if c is not None]


def plot_ablation(results: dict[str, dict], path: str | Path) -> Path:
    """One row per task and metric (``results`` as in ``ablation.json``): the metric's change from the clean model
    with the top-k heads ablated (red diamond) and with each random draw (dots, one colour per pool), with one draw's
    95% prediction interval as a bar. Metrics differ per row, so each row has its own units."""
    if not results:
        raise InputError("no ablation results to plot: run the ablation on at least one task with a model metric")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metric_rows(results)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.4))
    for i, (task, r) in enumerate(rows):
        controls = [r, *r.get("random_from", {}).values()]
        for j, c in enumerate(controls):
            y = i + (j - (len(controls) - 1) / 2) * 0.28
            colour = POOL_COLOURS[c.get("pool", "all")]
            if c.get("random_pi") is not None:  # absent in an older ablation.json
                lo, hi = np.asarray(c["random_pi"], dtype=float) - r["clean"]
                ax.plot([lo, hi], [y, y], color=colour, alpha=0.35, linewidth=5, solid_capstyle="butt")
            ax.scatter(np.asarray(c["random"]) - r["clean"], np.full(len(c["random"]), y), color=colour, s=12,
                       zorder=2)
        ax.scatter([r["top"] - r["clean"]], [i], marker="D", color="#c0392b", s=36, zorder=3)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{t} ({r['metric']})" for t, r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("metric with heads ablated minus the clean metric (left: the model does worse)")
    pools = {c.get("pool", "all") for r in results.values() for c in [r, *r.get("random_from", {}).values()]}
    handles = [plt.Line2D([], [], marker="D", color="#c0392b", linestyle="", label="top-k heads")]
    handles += [plt.Line2D([], [], marker="o", color=POOL_COLOURS[p], linewidth=5, alpha=0.6,
                           label=f"k random heads, {'all layers' if p == 'all' else 'layer-matched'}: draws and "
                                 "one draw's 95% interval") for p in POOL_COLOURS if p in pools]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06 - 0.5 / len(rows)),
              frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
