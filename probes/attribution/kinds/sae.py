"""Evidence from sparse autoencoders on a layer's z (heads concatenated; Kissane et al. 2024).

The decoder-norm share of every head in every feature (:func:`decoder_head_shares`), the per-input direct feature
attribution of every head (:func:`direct_feature_attribution`), how well each feature predicts a task's label
(:func:`feature_task_auroc`, with its null from shuffled labels: :func:`feature_ties`), and a head's importance for
the task: the share-weighted strength of the features tied to it, against the even spread of those features over
heads (:func:`sae_head_importance`). An SAE speaks about a task only on a labelled store of that task.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm, rankdata

from headprobe import InputError
from headprobe.extract.tasks.base import STAGES
from headprobe.probes.sae import decoder_head_shares
from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence


def direct_feature_attribution(z: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                               b_dec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each feature's pre-activation over heads.

    z (N, H, D); W_enc (F, H*D), b_enc (F,) and b_dec (H*D,) as a SparseAutoencoder (headprobe.probes.sae) and its
    checkpoint hold them; b_dec None for an SAE that does not subtract it before encoding. The pre-activation
    ``(z - b_dec) @ W_enc.T + b_enc`` equals ``per_head.sum(1) + bias``, with per_head (N, H, F) = z_h .
    W_enc[f, h-block] and bias (F,) = b_enc - W_enc @ b_dec.
    """
    N, H, D = z.shape
    F = b_enc.numel()
    if tuple(W_enc.shape) != (F, H * D):
        raise InputError(f"W_enc has shape {tuple(W_enc.shape)}; for {F} features over z of {H} heads x {D} it must "
                         f"be ({F}, {H * D}), as SparseAutoencoder.W_enc (transpose a (d_in, F) matrix first)")
    W = W_enc.to(z.dtype).view(F, H, D)
    per_head = torch.einsum("nhd,fhd->nhf", z, W)
    bias = b_enc.to(z.dtype)
    if b_dec is not None:
        bias = bias - W_enc.to(z.dtype) @ b_dec.to(z.dtype)
    return per_head, bias


def feature_task_auroc(acts: np.ndarray | torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """How well each feature's activation predicts the label: acts (N, F), labels (N,) -> AUROC (F,).

    Binary labels: the AUROC of the activation for class 1 (ties count half, so a feature that never fires
    scores 0.5). More classes: the mean one-vs-rest AUROC, each class's read in the direction that separates it
    best. Rows with label < 0 (unlabelled) are left out.
    """
    return _auroc_and_null_std(acts, labels)[0]


def _auroc_and_null_std(acts, labels) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (F,) and its standard deviation under shuffled labels (F,), exact for binary labels (the
    Mann-Whitney variance with the tie correction), from 32 label shuffles for more classes."""
    acts = acts.double().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts, np.float64)
    labels = np.asarray(labels)
    keep = labels >= 0
    acts, labels = acts[keep], labels[keep].astype(np.int64)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise InputError("feature AUROC needs at least two label classes among the rows")
    ranks = rankdata(acts, axis=0)  # (N, F), average ranks for ties

    def auroc(y: np.ndarray) -> np.ndarray:
        if len(classes) == 2:
            return _auroc_from_ranks(ranks, y == classes[1])
        return np.mean([0.5 + np.abs(_auroc_from_ranks(ranks, y == c) - 0.5) for c in classes], axis=0)

    if len(classes) == 2:
        n1 = int((labels == classes[1]).sum())
        n2, n = len(labels) - n1, len(labels)
        ties = _tie_sums(acts)  # sum over tie groups of t^3 - t, per feature
        var_u = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
        return auroc(labels), np.sqrt(np.clip(var_u, 0, None)) / (n1 * n2)
    rng = np.random.default_rng(0)
    null = np.stack([auroc(rng.permutation(labels)) for _ in range(32)])
    return auroc(labels), np.sqrt(((null - null.mean(0)) ** 2).mean(0) + (null.mean(0) - 0.5) ** 2)


def _auroc_from_ranks(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray:
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _tie_sums(acts: np.ndarray) -> np.ndarray:
    """Per column of acts (N, F): the sum over groups of equal values of t^3 - t (t = group size)."""
    n, f = acts.shape
    s = np.sort(acts, axis=0)
    run = np.cumsum(np.vstack([np.ones((1, f), bool), s[1:] != s[:-1]]), axis=0) - 1  # run index per row
    t = np.bincount((run + np.arange(f) * n).ravel(), minlength=n * f).reshape(f, n).astype(np.float64)
    return (t ** 3 - t).sum(1)


def feature_strength(auroc: np.ndarray) -> np.ndarray:
    """|2 AUROC - 1|: 0 for a feature that says nothing about the label, 1 for a perfect one (either sign)."""
    return np.abs(2 * np.asarray(auroc, dtype=np.float64) - 1)


def feature_ties(acts: np.ndarray | torch.Tensor, labels: np.ndarray, alpha: float = 0.01,
                 n_tests: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature AUROC (F,) and the strength each feature must exceed to be tied to the task (F,).

    A feature is tied when its AUROC is further from 0.5 than the two-sided Gaussian quantile for ``alpha`` of its
    own null distribution (shuffled labels; exact variance for binary labels), Bonferroni-corrected over
    ``n_tests`` features (default: the SAE's features). A feature that never fires cannot be tied.
    """
    auroc, null_std = _auroc_and_null_std(acts, labels)
    z = norm.ppf(1 - alpha / (2 * (n_tests or len(auroc))))
    return auroc, np.where(null_std > 0, 2 * z * null_std, np.inf)


def sae_head_importance(shares: np.ndarray, auroc: np.ndarray, tie_threshold: np.ndarray | float,
                        read: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Head importance for a task from one SAE, and its even-share null: (F, H), (F,) -> (H,), (H,).

    A feature is tied to the task when its strength |2 AUROC - 1| exceeds ``tie_threshold`` (scalar or (F,),
    from :func:`feature_ties`); it weighs by its excess strength. A head's importance is the share-weighted sum
    over the tied features; its null is the importance it would get if every tied feature were spread evenly
    over the heads the SAE reads (``read`` (H,) bool, default all; the others get NaN: no evidence), so a head
    passes when it holds more than its even part of the task's features.
    """
    read = np.ones(shares.shape[1], dtype=bool) if read is None else np.asarray(read, dtype=bool)
    weight = np.clip(feature_strength(auroc) - tie_threshold, 0, None)  # (F,)
    importance = weight @ np.asarray(shares, dtype=np.float64)  # (H,)
    null = np.full_like(importance, weight.sum() / max(1, read.sum()))
    importance[~read], null[~read] = np.nan, np.nan
    return importance, null


def sae_evidence(task: str, stage: str, saes: list[tuple[np.ndarray, np.ndarray, list[int]]], labels: np.ndarray,
                 layers: list[int], n_heads: int, alpha: float = 0.01) -> Evidence:
    """Evidence from SAEs: ``saes`` holds (latent activations (N, F), W_dec (F, n_layers_in * H * D), its model
    layers) per SAE, on the task's rows (labels (N,)). ``layers`` are the rows of the evidence; rows no SAE reads
    stay NaN (no evidence), as do heads an SAE does not read (decoder blocks that are zero in every feature, as
    the SAEs of a subset of heads are padded). An SAE over several layers splits its decoder into (layer, head)
    blocks."""
    score = np.full((len(layers), n_heads), np.nan)
    null = np.full_like(score, np.nan)
    tied = {}
    n_features = sum(np.shape(acts)[1] for acts, _, _ in saes)
    for acts, W_dec, sae_layers in saes:
        auroc, tau = feature_ties(acts, labels, alpha, n_tests=n_features)
        shares = decoder_head_shares(W_dec, len(sae_layers) * n_heads)  # (F, L' * H)
        blocks = np.asarray(W_dec).reshape(np.shape(W_dec)[0], len(sae_layers) * n_heads, -1)
        importance, even = sae_head_importance(shares, auroc, tau, read=np.abs(blocks).max(axis=(0, 2)) > 0)
        rows = [layers.index(layer) for layer in sae_layers]
        score[rows] = importance.reshape(len(sae_layers), n_heads)
        null[rows] = even.reshape(len(sae_layers), n_heads)
        strength = feature_strength(auroc)
        tied[",".join(map(str, sae_layers))] = {"n_tied": int((strength > tau).sum()), "n_features": len(auroc),
                                                "best_auroc": float(auroc[np.argmax(strength)])}
    return Evidence(task, stage, "sae", score, null, layers, metric="share-weighted tied-feature strength",
                    extra={"saes": tied})


def evidence_on_stores(saes: list[tuple[Path, object, dict]], stores: list, alpha: float, max_rows: int,
                            batch: int = 4096) -> list[Evidence]:
    """One evidence per labelled store, from every SAE (folder, config, tensors) on the store's rows; SAEs on other
    layers are pooled into the same evidence (one Bonferroni family over all their latents)."""
    from headprobe.probes.checkpoint import load_local

    modules = [(load_local(folder), config, tensors) for folder, config, tensors in saes]
    out = []
    for store in stores:
        meta = store.meta
        if meta.label_kind != "class" or meta.stage not in STAGES:
            continue
        labels = store.labels
        rows = np.flatnonzero(labels >= 0)
        if len(rows) > max_rows:
            rows = np.sort(np.random.default_rng(0).choice(rows, max_rows, replace=False))
        items = []
        for sae, config, tensors in modules:
            config.check_compatible(meta)
            slots = [meta.layers.index(layer) for layer in config.layers]
            z = store.activations(rows, layers=slots, heads=config.heads)  # (N, L', H', D)
            with torch.no_grad():
                acts = torch.cat([sae.encode(torch.from_numpy(z[i:i + batch])) for i in range(0, len(z), batch)])
            W_dec = tensors["W_dec"].double().view(-1, len(config.layers), len(config.heads or range(meta.n_heads)),
                                                   meta.d_head)
            if config.heads:  # blocks of heads the SAE does not read are empty (share 0)
                full = torch.zeros(W_dec.shape[0], W_dec.shape[1], meta.n_heads, meta.d_head, dtype=W_dec.dtype)
                full[:, :, config.heads] = W_dec
                W_dec = full
            items.append((acts.numpy(), W_dec.flatten(1).numpy(), list(config.layers)))
        layers = sorted({layer for _, _, ls in items for layer in ls})
        ev = sae_evidence(meta.task, meta.stage, items, labels[rows], layers, meta.n_heads, alpha)
        ev.extra["checkpoints"] = [str(folder) for folder, _, _ in saes]
        out.append(ev)
    return out


@register_kind
class SAEEvidence(EvidenceKind):
    name = "sae"
    reads = "SparseAutoencoder"

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        saes = [(c.folder, c.config, c.tensors) for c in inputs.checkpoints_of(self.reads)]
        if not saes:
            return []
        return evidence_on_stores(saes, inputs.stores, inputs.config.alpha, inputs.config.max_rows)
