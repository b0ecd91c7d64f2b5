"""How well an SAE recovers known features (ground-truth worlds, probes/synthetic.py), and how well two seeds agree
(the label-free signal), after SynthSAEBench (Chanin & Garriga-Alonso 2026) and Paulo & Belrose (arXiv 2505.20254).

Shapes: ``W`` (n, d) an SAE's decoder rows (one latent each), ``D`` (F, d) the true unit feature directions; codes
``f`` (N, n) latent activations of N rows whose truth is CSR ``crow`` (N + 1,), ``feature`` (nnz,).

    MCC          one-to-one Hungarian matching of latents to true features by |cos|, mean matched |cos|
    uniqueness   distinct true features among the latents' best matches / latents
    precision, recall, F1   each latent as a detector of its best-matching true feature (fires: f != 0; truth: the
                 feature fires), averaged over latents; a latent that never fires scores 0
    found        true features whose best |cos| to any latent exceeds 0.9
    consistency  each latent's best |cos| to another seed's decoder; the two decoders' MCC
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr
from torch import Tensor

from headprobe import InputError

FOUND_COS = 0.9


def abs_cos(W: Tensor, D: Tensor) -> Tensor:
    """(n, F) |cos| between the rows of W (n, d) and D (F, d); zero rows give 0."""
    if W.shape[1] != D.shape[1]:
        raise InputError(f"decoder rows have {W.shape[1]} dimensions but the directions {D.shape[1]}: pass both "
                         f"in the same space")
    Wn = W.double() / W.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    Dn = D.double() / D.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (Wn @ Dn.T).abs_().float()


def mcc(W: Tensor, D: Tensor, cos: Tensor | None = None) -> float:
    """Mean |cos| of the best one-to-one matching of W's rows to D's rows (min(n, F) pairs)."""
    c = (abs_cos(W, D) if cos is None else cos).numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].mean())


@dataclass
class TruthScores:
    """Feature recovery of one SAE; ``latent_cos`` (n,) each latent's best |cos| to a true feature, ``best`` (n,)
    which feature."""

    mcc: float
    uniqueness: float
    precision: float
    recall: float
    f1: float
    found: int
    n_features: int
    latent_cos: Tensor
    best: Tensor

    def row(self) -> dict:
        return {"mcc": self.mcc, "uniqueness": self.uniqueness, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "found": self.found}


def detection_counts(f: Tensor, crow: Tensor, feature: Tensor, best: Tensor, chunk: int = 4096
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """(n,) true positives, latent firings and feature firings of each latent against its feature ``best`` (n,)."""
    N, n = f.shape
    F = int(max(int(feature.max()) + 1 if len(feature) else 0, int(best.max()) + 1))
    tp, fired, truth = (torch.zeros(n, dtype=torch.long) for _ in range(3))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        lo, hi = int(crow[s]), int(crow[e])
        rows = torch.repeat_interleave(torch.arange(e - s), crow[s + 1:e + 1] - crow[s:e])
        on = torch.zeros(e - s, F, dtype=torch.bool)
        on[rows, feature[lo:hi]] = True
        t = on[:, best]  # (b, n): the latent's feature fires
        a = f[s:e] != 0
        tp += (a & t).sum(0)
        fired += a.sum(0)
        truth += t.sum(0)
    return tp, fired, truth


def truth_scores(W: Tensor, D: Tensor, f: Tensor, crow: Tensor, feature: Tensor) -> TruthScores:
    """Every recovery figure of an SAE with decoder W (n, d) whose codes on rows with truth (crow, feature) are f."""
    if len(crow) != len(f) + 1:
        raise InputError(f"codes of {len(f)} rows but truth for {len(crow) - 1}: pass the same rows")
    cos = abs_cos(W, D)
    latent_cos, best = cos.max(1)
    tp, fired, truth = (c.double() for c in detection_counts(f, crow, feature, best))
    precision = torch.where(fired > 0, tp / fired.clamp_min(1), 0.0)
    recall = torch.where(truth > 0, tp / truth.clamp_min(1), 0.0)
    denom = fired + truth
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), 0.0)
    return TruthScores(mcc(W, D, cos), len(best.unique()) / len(W), float(precision.mean()), float(recall.mean()),
                       float(f1.mean()), int((cos.max(0).values > FOUND_COS).sum()), len(D), latent_cos, best)


@dataclass
class Consistency:
    """Agreement of two seeds' decoders: ``a`` (n_a,) each latent of the first seed's best |cos| to the second
    seed's latents, ``b`` (n_b,) the reverse, ``mcc`` of the pair."""

    a: Tensor
    b: Tensor
    mcc: float

    def consistent(self, level: float = FOUND_COS) -> Tensor:
        """(n_a,) bool: the first seed's latents found again by the second at |cos| > ``level``."""
        return self.a > level


def seed_consistency(W_a: Tensor, W_b: Tensor) -> Consistency:
    """Consistency of decoders W_a (n_a, d) and W_b (n_b, d) trained on the same data from different seeds."""
    cos = abs_cos(W_a, W_b)
    return Consistency(cos.max(1).values, cos.max(0).values, mcc(W_a, W_b, cos))


def consistency_vs_truth(consistency: Tensor, latent_cos: Tensor, level: float = FOUND_COS) -> dict:
    """How well consistency (n,) predicts that a latent is a true feature (latent_cos (n,) > ``level``): Spearman
    over latents, and the precision and recall of "consistency > level" as a detector."""
    true = latent_cos > level
    flagged = consistency > level
    hits = int((true & flagged).sum())
    return {"spearman": float(spearmanr(consistency.numpy(), latent_cos.numpy()).statistic),
            "precision": hits / max(1, int(flagged.sum())), "recall": hits / max(1, int(true.sum())),
            "flagged": int(flagged.sum()), "true": int(true.sum())}
