"""Negative attention score of every head (Yu et al. 2024, "Correcting Negative Bias in Large Language Models
through Negative Attention Score Alignment", arXiv 2408.00137, NAACL 2025), on the binary questions of
:mod:`headprobe.extract.tasks.yes_no`.

Definition implemented: in a prompt whose instruction names both answer candidates, with A the head's attention
pattern, p and n the positions of the positive ("Yes") and negative ("No") candidate and the query positions i
after the instruction (the question and the end of the prompt),

    NAS = sum_i (A[i, p] + A[i, n]) * log(A[i, n] / A[i, p]),

the attention the head pays the candidates at all, times the log-ratio of its preference for the negative one; a
head's score is the mean over prompts. Departures: the paper's definition reaches us through summaries (its text
is not stored here), so the sum's range and weighting follow them (reference.md section 7; "A the attention matrix,
p/n the candidates' token indices, the instruction prefix bounding the sum"); a candidate of several tokens (a
byte-level tokenizer's) gets the mean attention over its tokens, so that " Yes" (4 bytes) and " No" (3) weigh alike; ``eps`` = 1e-6 keeps the log finite.

Null, per head, the larger of two thresholds. (1) Consistency, a sign-flip (randomisation) test: swapping the
candidates' roles flips NAS's sign and every question comes in both candidate orders, so a head with no preference
has per-prompt scores centred on 0; the threshold is z_{1 - alpha/(L*H)} times the sign-flip standard deviation of
the mean, sqrt(sum_e NAS_e^2) / n (normal approximation, Bonferroni over heads). (2) Specificity, a random-word
baseline: the same questions with an unrelated pair of words as the candidates (" Red"/" Blue", " Up"/" Down", ...;
``yes_no.PLACEBO_WORDS``); the threshold is the head's largest |mean NAS| over those pairs. On SmolLM2-135M the
consistency test alone passes about 100 of 270 heads for "Yes"/"No" and 20 to 76 for each unrelated pair (heads that
prefer one token of a pair are common), and the unrelated pairs reach |NAS| of 1.1 to 3.1, as much as "No" gets: a
negative head must prefer "No" more than it prefers any word of an unrelated pair. Alongside, the model's own
answers (the first token where the replies differ, "Yes" against "No"): accuracy, the share of "No", and the
precision and recall of "Yes", whose gap is the paper's negative bias.

Cost: one forward pass per batch of prompts (about 45 tokens each on SmolLM2, the placebo prompts included), all
heads read at once through :mod:`.attention_capture`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from headprobe.probes.checks.attention_capture import capture_attention, require_causal_lm, right_padded

EPS = 1e-6


@dataclass
class NegativeResult:
    score: np.ndarray  # (L, H) mean NAS over prompts
    null: np.ndarray  # (L, H) sign-flip threshold
    per_prompt: np.ndarray  # (n, L, H)
    answers: dict = field(default_factory=dict)  # the model's own answers


def nas_from_weights(weights: torch.Tensor, yes: torch.Tensor, no: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """NAS per prompt and head from one layer's attention weights (B, H, Q, K) and 0/1 masks over keys ``yes``,
    ``no`` (B, K) and over queries ``query`` (B, Q): (B, H). A candidate's attention is the mean over its tokens."""
    w = weights.double()
    a_yes = torch.einsum("bhqk,bk->bhq", w, yes.double() / yes.sum(1, keepdim=True))
    a_no = torch.einsum("bhqk,bk->bhq", w, no.double() / no.sum(1, keepdim=True))
    per_query = (a_yes + a_no) * torch.log((a_no + EPS) / (a_yes + EPS))
    return torch.einsum("bhq,bq->bh", per_query, query.double())


def _masks(questions, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = torch.arange(width)
    span = lambda s: (pos >= s[0]) & (pos < s[1])  # noqa: E731
    yes = torch.stack([span(q.yes) for q in questions])
    no = torch.stack([span(q.no) for q in questions])
    query = torch.stack([(pos >= q.query_start) & (pos < len(q.ids)) for q in questions])
    return yes, no, query


@torch.no_grad()
def nas_batch(model: nn.Module, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt NAS of every head (B, L, H) and the model's reply logits for ("Yes", "No") (B, 2), one forward."""
    device = next(model.parameters()).device
    ids, mask = right_padded([q.ids for q in questions])
    yes, no, query = (m.to(device) for m in _masks(questions, ids.shape[1]))
    with capture_attention(model, lambda w: nas_from_weights(w, yes, no, query).cpu()) as cap:
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        scores = cap.stacked()
    last = hidden[torch.arange(len(questions)), mask.sum(1).to(device) - 1]
    logits = model.get_output_embeddings()(last)
    pair = torch.tensor([q.answer_ids for q in questions], device=device)
    return scores, logits.gather(1, pair).float().cpu()


def answer_stats(logits: np.ndarray, truth: np.ndarray) -> dict:
    """The model's own answers from (n, 2) logits of "Yes" and "No": accuracy, share of "No", precision and recall
    of "Yes" (negative bias: recall below precision)."""
    says_yes = logits[:, 0] > logits[:, 1]
    tp = float((says_yes & (truth == 1)).sum())
    return {"questions": int(len(truth)), "accuracy": float((says_yes == (truth == 1)).mean()),
            "no_rate": float((~says_yes).mean()),
            "yes_precision": tp / float(says_yes.sum()) if says_yes.any() else float("nan"),
            "yes_recall": tp / float((truth == 1).sum()) if (truth == 1).any() else float("nan")}


def sign_flip_null(per_prompt: np.ndarray, alpha: float = 0.01) -> np.ndarray:
    """(L, H) threshold on the mean of per-prompt scores (n, L, H) under random sign flips (normal approximation,
    Bonferroni over the L x H heads)."""
    n = per_prompt.shape[0]
    spread = np.sqrt((per_prompt ** 2).sum(0)) / n
    return norm.ppf(1 - alpha / per_prompt[0].size) * spread


def _per_prompt(model: nn.Module, questions, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    scores, logits = [], []
    for i in range(0, len(questions), batch_size):
        s, lg = nas_batch(model, questions[i:i + batch_size])
        scores.append(s)
        logits.append(lg)
    return torch.cat(scores).numpy(), torch.cat(logits).numpy()


def negative_scores(model: nn.Module, questions, placebos: dict[str, list] | None = None, batch_size: int = 16,
                    alpha: float = 0.01) -> NegativeResult:
    """Negative attention scores of every head over binary ``questions``, against the null of the module's
    docstring: the sign-flip threshold and, per head, the largest |mean NAS| over the ``placebos`` ({pair name:
    the same questions with that pair as candidates}); all prompts go through the model in one series of batches."""
    require_causal_lm(model, "negative attention score")
    placebos = placebos or {}
    every = [q for qs in (questions, *placebos.values()) for q in qs]
    per_prompt, logits = _per_prompt(model, every, batch_size)
    n = len(questions)
    null = sign_flip_null(per_prompt[:n], alpha)
    placebo, start = {}, n
    for name, qs in placebos.items():
        placebo[name] = per_prompt[start:start + len(qs)].mean(0)
        start += len(qs)
    if placebo:
        null = np.maximum(null, np.abs(np.stack(list(placebo.values()))).max(0))
    truth = np.array([q.truth for q in questions])
    stats = answer_stats(logits[:n], truth)
    stats["placebo_max"] = {k: float(np.abs(v).max()) for k, v in placebo.items()}
    return NegativeResult(per_prompt[:n].mean(0), null, per_prompt[:n], stats)
