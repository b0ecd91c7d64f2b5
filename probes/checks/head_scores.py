"""Modeling-free cross-check: attention-pattern scores of previous-token, duplicate-token and induction heads.

On a batch of ``[BOS, r1..rn, r1..rn]`` (random tokens), with A a head's attention pattern (query i, key j) and P a
0/1 detection pattern, the score is ``sum(A * P) / sum(A)`` over the queries of the second half (the
TransformerLens head-detector "mul" score; Olsson et al. 2022):

- previous-token: P[i, i-1] = 1;
- duplicate-token: P[i, j] = 1 where tok_i = tok_j, j < i;
- induction: P[i, j+1] = 1 where tok_i = tok_j, j < i (on this input: the diagonal at offset 1 - n).

Scores above ~0.4 mark the type. Attention patterns need eager attention (``sdpa`` returns none); the model is
switched to eager for the measurement and back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from headprobe import InputError

HEAD_TYPES = ("previous_token", "duplicate_token", "induction")
HEAD_TYPE_STAGE = {"previous_token": "ICI", "duplicate_token": "ICI", "induction": "LR"}  # survey's taxonomy
TYPE_THRESHOLD = 0.4


def repeated_random_tokens(n: int = 50, batch: int = 8, vocab_size: int = 1000, bos: int | None = None,
                           low: int = 0, seed: int = 0) -> torch.Tensor:
    """(batch, [1 +] 2n) token ids: [BOS,] r1..rn, r1..rn with r drawn without replacement from [low, vocab_size)."""
    if n > vocab_size - low:
        raise InputError(f"{n} distinct tokens asked from the {vocab_size - low} ids in [{low}, {vocab_size}): use a "
                         f"shorter sequence")
    g = torch.Generator().manual_seed(seed)
    r = torch.stack([low + torch.randperm(vocab_size - low, generator=g)[:n] for _ in range(batch)])
    tokens = torch.cat([r, r], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((batch, 1), bos, dtype=tokens.dtype), tokens], dim=1)
    return tokens


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """0/1 patterns (B, S, S) per head type for a batch of tokens (B, S), query i on rows, key j on columns."""
    B, S = tokens.shape
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, i, j)
    earlier = torch.ones(S, S, dtype=torch.bool).tril(-1)  # j < i
    dup = same & earlier
    induction = torch.zeros_like(dup)
    induction[:, :, 1:] = dup[:, :, :-1]  # P[i, j+1] = dup[i, j]
    prev = torch.zeros(S, S, dtype=torch.bool)
    prev[torch.arange(1, S), torch.arange(S - 1)] = True
    return {"previous_token": prev.expand(B, S, S), "duplicate_token": dup, "induction": induction}


def pattern_scores(attn: torch.Tensor, tokens: torch.Tensor, n: int | None = None) -> dict[str, np.ndarray]:
    """Scores per head type from attention patterns attn (B, L, H, S, S) on ``tokens`` (B, S) -> {type: (L, H)}.

    Only the last ``n`` query positions count (the repeated half); ``n=None`` uses every query.
    """
    B, L, H, S, _ = attn.shape
    q0 = 0 if n is None else S - n
    a = attn[:, :, :, q0:].double()  # (B, L, H, Q, S)
    total = a.sum(dim=(0, 3, 4))  # (L, H)
    out = {}
    for name, p in detection_patterns(tokens).items():
        hit = torch.einsum("blhqk,bqk->lh", a, p[:, q0:].double())
        out[name] = (hit / total).numpy()
    return out


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch a Hugging Face model to eager attention (so it returns attention patterns), then back."""
    old = getattr(model.config, "_attn_implementation", None)
    if old != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if old is not None and old != "eager":
            model.set_attn_implementation(old)


@torch.no_grad()
def attention_patterns(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Every head's attention pattern on ``tokens`` (B, S): (B, L, H, S, S), float32."""
    with eager_attention(model):
        device = next(model.parameters()).device
        out = model.base_model(input_ids=tokens.to(device), output_attentions=True)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise RuntimeError(f"{model.config.model_type} returned no attention patterns with output_attentions=True:"
                           f" load it with attn_implementation='eager'")
    return torch.stack(attentions, dim=1).float().cpu()


def head_type_scores(model: nn.Module, n: int = 50, batch: int = 8, seed: int = 0, bos: int | None = None,
                     vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and induction scores of every head: {type: (L, H)}.

    ``bos`` defaults to the model config's ``bos_token_id``; random tokens come from the first ``vocab_size``
    ids (default: the whole vocabulary), between the special tokens (BOS, EOS, padding) at its bottom and those at
    its top (as Llama 3's, from 128000 on).
    """
    cfg = model.config
    vocab = vocab_size or cfg.vocab_size
    bos = cfg.bos_token_id if bos is None else bos
    bos = bos if isinstance(bos, int) and 0 <= bos < cfg.vocab_size else None  # a config's id outside its vocabulary
    special = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, bos) if isinstance(t, int)}
    low = 1 + max([t for t in special if t < vocab // 2], default=0)
    high = min([t for t in special if vocab // 2 <= t < vocab], default=vocab)
    tokens = repeated_random_tokens(n, batch, high, bos, low=low, seed=seed)
    return pattern_scores(attention_patterns(model, tokens), tokens, n)


def head_types(scores: dict[str, np.ndarray], threshold: float = TYPE_THRESHOLD) -> dict[tuple[int, int], list[str]]:
    """{(layer, head): [types scoring above threshold]} for every head with at least one type."""
    out: dict[tuple[int, int], list[str]] = {}
    for name in HEAD_TYPES:
        for layer, head in zip(*np.nonzero(scores[name] > threshold)):
            out.setdefault((int(layer), int(head)), []).append(name)
    return out


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 8) -> int:
    """How many of the ``k`` heads ranked highest by map ``a`` (L, H) are among the ``k`` highest by ``b`` (NaN:
    lowest)."""
    def top(x: np.ndarray) -> set[int]:
        x = np.nan_to_num(np.asarray(x, dtype=np.float64).ravel(), nan=-np.inf)
        return set(np.argsort(-x, kind="stable")[:k].tolist())

    return len(top(a) & top(b))


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho between two per-head maps (L, H) over the heads where both are finite."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")  # undefined for a constant map (e.g. a sparse probe that kept no head of these)
    return float(spearmanr(a[ok], b[ok]).statistic)


def typed_auroc(score: np.ndarray, pattern: np.ndarray, threshold: float = TYPE_THRESHOLD) -> float:
    """How well a per-head ``score`` (L, H) separates the heads a ``pattern`` score (L, H) types (above
    ``threshold``) from the rest: AUROC over all heads (NaN scores rank lowest); NaN without both kinds of head."""
    from sklearn.metrics import roc_auc_score

    typed = np.asarray(pattern).ravel() > threshold
    if typed.all() or not typed.any():
        return float("nan")
    s = np.asarray(score, dtype=np.float64).ravel()
    low = np.nanmin(s) - 1 if np.isfinite(s).any() else 0.0
    return float(roc_auc_score(typed, np.where(np.isnan(s), low, s)))


def copy_carriers(score: np.ndarray, layers: list[int], induction: np.ndarray, k: int = 16,
                  threshold: float = TYPE_THRESHOLD) -> tuple[int, int, int | None]:
    """Of the (up to) ``k`` heads that ``score`` (L', H) over model ``layers`` ranks highest (NaN: not ranked, e.g.
    below the evidence's null), how many sit after the first layer holding an induction head (``induction`` (L, H)
    over all layers above ``threshold``) without being one: heads that carry a copied token they did not copy.
    Returns (that count, the heads ranked, that first layer; None without one)."""
    typed = np.nonzero((induction > threshold).any(1))[0]
    s = np.asarray(score, dtype=np.float64)
    ranked = np.argsort(np.where(np.isnan(s), np.inf, -s), axis=None, kind="stable")[:min(k, int(np.isfinite(s).sum()))]
    if not len(typed):
        return 0, len(ranked), None
    first = int(typed[0])
    rows, heads = np.unravel_index(ranked, s.shape)
    n = sum(layers[r] > first and induction[layers[r], h] <= threshold for r, h in zip(rows, heads))
    return int(n), len(ranked), first


def plot_against_pattern(pattern: np.ndarray, panels: list[tuple[str, np.ndarray, list[int]]], path: str | Path,
                         name: str = "induction", threshold: float = TYPE_THRESHOLD) -> Path:
    """One scatter per (title, score (L', H), model layers): each head's score against its ``pattern`` score
    (L, H), coloured by layer; heads typed by the pattern (above ``threshold``) are named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.8, 3.6), squeeze=False)
    n_layers = pattern.shape[0]
    for ax, (title, score, layers) in zip(axes[0], panels):
        x = pattern[layers]  # (L', H)
        depth = np.broadcast_to(np.asarray(layers)[:, None], x.shape)
        dots = ax.scatter(x.ravel(), score.ravel(), c=depth.ravel(), cmap="viridis", vmin=0, vmax=n_layers - 1,
                          s=14, edgecolors="none")
        for r, h in zip(*np.nonzero(x > threshold)):
            if np.isfinite(score[r, h]):
                ax.annotate(f"L{layers[r]}.H{h}", (x[r, h], score[r, h]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        ax.axvline(threshold, color="#bbb", linewidth=0.8, linestyle="--")
        ax.set_xlabel(f"{name.replace('_', '-')} score (attention pattern)")
        ax.set_ylabel("evidence score")
        ax.set_title(f"{title}: rho {rank_agreement(score, x):.2f}", fontsize=9)
    fig.colorbar(dots, ax=axes[0].tolist(), label="layer", fraction=0.04)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
