"""Per-probe metrics, vectorised over every probe at once.

Shapes: ``logits`` (N, P, C) for P probes (C = 1: binary logit or regression output; C > 1: class logits),
``y`` (N, P) labels (a probe may have its own labels, e.g. a control task). Every function returns (P,) arrays.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor
from torch.nn import functional as F


def predictions(logits: Tensor, loss: str) -> Tensor:
    """Predicted class (N, P) for classifiers, predicted value for ridge."""
    if loss == "ridge":
        return logits[..., 0]
    if logits.shape[-1] == 1:
        return (logits[..., 0] > 0).long()
    return logits.argmax(-1)


def accuracy(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    return (predictions(logits, loss) == y).double().mean(0)


def mean_loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    """Mean log-loss (logistic, softmax) or mean squared error (ridge) per probe."""
    if loss == "ridge":
        return (logits[..., 0].double() - y).pow(2).mean(0)
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits[..., 0].double(), y.double(), reduction="none").mean(0)
    logp = logits.double().log_softmax(-1)
    return -logp.gather(-1, y.long()[..., None])[..., 0].mean(0)


def r2(pred: Tensor, y: Tensor) -> Tensor:
    y = y.double()
    return 1 - (pred.double() - y).pow(2).sum(0) / (y - y.mean(0)).pow(2).sum(0).clamp_min(1e-12)


def auroc(scores: Tensor, y: Tensor) -> Tensor:
    """Binary AUROC per probe from scores (N, P) and 0/1 labels (N, P) (Mann-Whitney U; ties count 1/2); NaN
    where the labels hold one class only."""
    ranks = torch.from_numpy(rankdata(scores.double().cpu().numpy(), axis=0))
    pos = y.cpu().double()
    n_pos, n_neg = pos.sum(0), (1 - pos).sum(0)
    u = (ranks * pos).sum(0) - n_pos * (n_pos + 1) / 2
    pairs = n_pos * n_neg
    return torch.where(pairs > 0, u / pairs.clamp_min(1), torch.nan)


def probe_metrics(logits: Tensor, y: Tensor, loss: str) -> dict[str, Tensor]:
    """{"acc", "loss", "auroc" (binary)} or {"r2", "loss"} (ridge), each (P,)."""
    out = {"loss": mean_loss(logits, y, loss)}
    if loss == "ridge":
        out["r2"] = r2(logits[..., 0], y)
        return out
    out["acc"] = accuracy(logits, y, loss)
    if logits.shape[-1] == 1:
        out["auroc"] = auroc(logits[..., 0], y)
    return out


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean of ``correct`` (N, P) per column, resampling rows: (lo, hi) each (P,)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(1)  # (n_boot, P)
    alpha = (1 - level) / 2
    return np.quantile(means, alpha, axis=0), np.quantile(means, 1 - alpha, axis=0)
