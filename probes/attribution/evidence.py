"""Evidence about heads: one task's (layers x heads) score from one kind of artifact or check, with its null.

Every kind of evidence (:mod:`.contract`) returns :class:`Evidence`; the stage map pools them (:mod:`.stage_map`),
and each task's heads are ranked from them (:func:`top_heads`).

Nulls: linear-probe accuracy against control probes (Hewitt & Liang 2019; :func:`null_threshold`, a Gaussian
null Bonferroni-corrected over heads); group-lasso norms against 0 (a kept head); SAE shares against an even spread
of the task's features over heads; pattern scores against the type threshold; ablation against random heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from headprobe import InputError


@dataclass
class Evidence:
    """One task's head importance from one artifact, with its null, over (layers, heads).

    ``score`` and ``null`` are (L, H) over the model's layers (NaN where the artifact says nothing, e.g. layers
    an SAE was not trained on); a head is above the null where ``score > null``. ``layers`` are the model layer
    numbers of the rows.
    """

    task: str
    stage: str  # KR, ICI, LR or EP
    source: str  # "linear", "sparse", "sae", ...
    score: np.ndarray  # (L, H)
    null: np.ndarray  # (L, H), or broadcastable to it
    layers: list[int]
    metric: str = ""  # what score measures, for the report ("val accuracy", "group norm", ...)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.score = np.asarray(self.score, dtype=np.float64)
        self.null = np.broadcast_to(np.asarray(self.null, dtype=np.float64), self.score.shape).copy()
        if self.score.ndim != 2 or self.score.shape[0] != len(self.layers):
            raise InputError(f"evidence for task {self.task!r}: score has shape {self.score.shape}, expected "
                             f"({len(self.layers)} layers, heads)")

    def to_json(self) -> dict:
        """A JSON-able dict (NaN as null), read back by :meth:`from_json`."""
        grid = lambda a: [[None if np.isnan(v) else float(v) for v in row] for row in a]  # noqa: E731
        return {"task": self.task, "stage": self.stage, "source": self.source, "metric": self.metric,
                "layers": list(self.layers), "score": grid(self.score), "null": grid(self.null), "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "Evidence":
        grid = lambda a: np.array(a, dtype=np.float64)  # noqa: E731  (None -> NaN)
        return cls(data["task"], data["stage"], data["source"], grid(data["score"]), grid(data["null"]),
                   list(data["layers"]), data.get("metric", ""), data.get("extra", {}))

    def excess(self) -> np.ndarray:
        """(L, H) score above the null, 0 where at or below it or unknown."""
        return np.nan_to_num(np.clip(self.score - self.null, 0, None), nan=0.0)


def selectivity(val_acc: np.ndarray, control_acc: np.ndarray) -> np.ndarray:
    """Accuracy minus control accuracy, per head: (L, H), (L, H) -> (L, H)."""
    return np.asarray(val_acc, dtype=np.float64) - np.asarray(control_acc, dtype=np.float64)


def null_threshold(control: np.ndarray, alpha: float = 0.01, n_tests: int | None = None,
                   min_std: float = 0.0) -> float:
    """The value a score must exceed to be above the null, from control scores (shuffled labels, control tasks).

    The control scores' mean plus z_{1 - alpha/n_tests} of their standard deviation (at least ``min_std``): a
    Gaussian null with a Bonferroni correction over ``n_tests`` (default: the number of control scores, i.e. one
    test per head).
    """
    c = np.asarray(control, dtype=np.float64)
    c = c[np.isfinite(c)]
    if c.size == 0:
        raise InputError("no finite control scores to take a null threshold from")
    n = n_tests or c.size
    spread = max(c.std(ddof=1) if c.size > 1 else 0.0, min_std)
    return float(c.mean() + norm.ppf(1 - alpha / n) * spread)


def probe_importance(val_acc: np.ndarray, control_acc: np.ndarray, alpha: float = 0.01,
                     n_val: int | None = None) -> tuple[np.ndarray, float]:
    """Per-head probe accuracy (L, H) and its null threshold from the control probes' accuracies (L, H).

    With ``n_val`` (validation examples) the null's spread is at least the binomial standard deviation of a
    chance-level accuracy, sqrt(0.25 / n_val), which guards against a control spread that happens to be small.
    """
    min_std = 0.5 / np.sqrt(n_val) if n_val else 0.0
    return np.asarray(val_acc, dtype=np.float64), null_threshold(control_acc, alpha, min_std=min_std)


def scaled_excess(ev: Evidence, scale: str, cells: int | None = None) -> np.ndarray:
    """``ev``'s excess over its null (L, H), scaled so that evidences of different units pool: ``max`` divides by
    the largest excess (the task's best head scores 1); ``share`` by the total excess, times the fraction of the
    ``cells`` (heads of the map) the evidence covers (its heads with a score), so each head holds its share of what
    the task found. An evidence with no excess stays 0."""
    ex = ev.excess()
    if scale == "max":
        norm = ex.max()
    else:
        covered = max(1, int(np.isfinite(ev.score).sum()))  # heads the evidence measured (NaN: not measured)
        norm = ex.sum() * (cells or ex.size) / covered
    return ex / norm if norm > 0 else ex


def over_all_heads(a: np.ndarray, heads: list[int] | None, n_heads: int) -> np.ndarray:
    """(L, H') over a checkpoint's heads -> (L, H) over all heads, NaN for heads it did not read."""
    a = np.asarray(a, dtype=np.float64)
    if heads is None:
        return a
    out = np.full((a.shape[0], n_heads), np.nan)
    out[:, heads] = a
    return out


# --- ranking heads for one task ---------------------------------------------------------------------------------
def task_ranking(evidence: list[Evidence], task: str) -> tuple[list[int], np.ndarray]:
    """(layers, (L, H) ranking score) of one task: mean over its evidence of the excess scaled by its best head
    (:func:`scaled_excess` with ``max``), with the raw score (scaled to [0, 1e-3]) breaking ties among heads below
    the null."""
    mine = [ev for ev in evidence if ev.task == task]
    layers = sorted({layer for ev in mine for layer in ev.layers})
    total = np.zeros((len(layers), mine[0].score.shape[1]))
    for ev in mine:
        rows = [layers.index(layer) for layer in ev.layers]
        s = np.nan_to_num(ev.score, nan=np.nanmin(ev.score))
        span = s.max() - s.min()
        total[rows] += scaled_excess(ev, "max") + 1e-3 * ((s - s.min()) / span if span > 0 else 0)
    return layers, total / len(mine)


def top_heads(evidence: list[Evidence], task: str, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads (layer, head) of ``task`` ranked highest by :func:`task_ranking`."""
    layers, score = task_ranking(evidence, task)
    order = np.argsort(-score, axis=None, kind="stable")[:k]
    return [(layers[i], int(h)) for i, h in zip(*np.unravel_index(order, score.shape))]
