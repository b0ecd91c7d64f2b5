"""Retrieval score of every head (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", arXiv 2404.15574), on the needle-in-a-haystack prompts of :mod:`headprobe.extract.tasks.needle`.

Definition implemented (the paper's, Section 2, and its reference code): at a decoding step the model emits token
w; head h *copy-pastes* at that step when (1) w lies in the needle's answer span k and (2) the key position the
head attends to most (top-1 of its attention row) lies in k and holds w. With g_h the set of answer positions head
h copy-pasted while answering, the score of one prompt is ``|g_h| / |k|`` (the paper's ``|g_h ∩ k| / |k|``), and
a head's retrieval score is the mean over prompts. Two variants:

- ``generate`` (the paper's): greedy decoding for |k| + 2 steps; only prompts the model answers count, as in the
  reference code (there: ROUGE-1 recall of the answer above 50%; here: the share of the answer's distinct token
  ids among the generated ones above 0.5, token ids instead of words);
- ``teacher``: the answer is fed (teacher forcing) and w is the answer's token at each step; every prompt counts,
  so the score does not depend on the model getting the answer.

Departures: the paper sweeps 20 lengths up to 50K tokens and 10 depths on Llama-scale models; the defaults here
are 3 lengths (256-1024) x 3 depths x 4 needles. The reply starts with the needle's statement (see
:mod:`headprobe.extract.tasks.needle`). Null: the same score with the emitted tokens shuffled within each answer
(8 permutations): a head that looks at the answer without copying the token being emitted scores ~1/|k| there;
a head counts as a retrieval head above ``max(0.1, that null)`` (0.1 is the paper's threshold).

Cost: per batch of prompts of one length, one prefill of the prompt but its last token (the model's own attention
implementation, no LM head), then with eager attention one teacher-forced chunk of |k| tokens on a copy of the
key-value cache and |k| + 2 one-token decoding steps; every head of every layer is read in those passes (the top-1
key of each attention row, kept by :mod:`.attention_capture`), with no loop over heads.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from headprobe import InputError
from headprobe.probes.checks.attention_capture import capture_attention, require_causal_lm, right_padded

THRESHOLD = 0.1  # Wu et al.: heads above it are retrieval heads
N_SHUFFLES = 8
EXTRA_STEPS = 2  # decoding steps past the answer's length


@dataclass
class RetrievalResult:
    """Scores (L, H) of both variants, their shuffled-target nulls (L, H), and how well the model retrieves."""

    teacher: np.ndarray
    generate: np.ndarray
    teacher_null: np.ndarray
    generate_null: np.ndarray
    accuracy: dict = field(default_factory=dict)
    prompts: list[dict] = field(default_factory=list)


def copied_share(top: torch.Tensor, emitted: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor,
                 span: torch.Tensor) -> torch.Tensor:
    """Per prompt and head, the share of the answer span's positions copy-pasted.

    top (B, L, H, T): each head's most attended key position at each step; emitted (B, T) the token emitted at that
    step; valid (B, T) which steps count; ids (B, S) the input tokens; span (B, 2) the answer's [start, end).
    Returns (B, L, H) = |distinct span positions copied| / span length.
    """
    B, L, H, T = top.shape
    held = ids.gather(1, top.reshape(B, -1)).reshape(B, L, H, T)  # token at the attended position
    start, end = span[:, 0].view(B, 1, 1, 1), span[:, 1].view(B, 1, 1, 1)
    hit = (top >= start) & (top < end) & (held == emitted.view(B, 1, 1, T)) & valid.view(B, 1, 1, T)
    width = int((span[:, 1] - span[:, 0]).max())
    rel = (top - start).clamp(0, width - 1)  # position within the span
    onehot = torch.nn.functional.one_hot(rel, width).bool() & hit[..., None]  # (B, L, H, T, K)
    return onehot.any(3).sum(-1).double() / (span[:, 1] - span[:, 0]).view(B, 1, 1).double()


def shuffled_share(top, emitted, valid, ids, span, n: int = N_SHUFFLES, seed: int = 0) -> torch.Tensor:
    """:func:`copied_share` with the emitted tokens permuted within each prompt's valid steps, mean of ``n``
    permutations: (B, L, H)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(top.shape[:3], dtype=torch.float64)
    counts = valid.sum(1)
    for _ in range(n):
        keys = torch.rand(emitted.shape, generator=g) + (~valid) * 2.0  # valid steps first, in random order
        order = keys.argsort(1)
        inverse = torch.arange(emitted.shape[1]).expand_as(emitted)
        shuffled = emitted.clone()
        take = inverse < counts[:, None]
        shuffled[take] = emitted.gather(1, order)[take]  # valid steps get a permutation of the valid tokens
        out += copied_share(top, shuffled, valid, ids, span)
    return out / n


def _batch_answers(prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded answers (B, T), their mask (B, T) and the answer spans (B, 2)."""
    answers, mask = right_padded([p.answer for p in prompts])
    return answers, mask.bool(), torch.tensor([p.span for p in prompts], dtype=torch.long)


def _with_cache(model: nn.Module, cache) -> dict:
    """The keyword that passes a key-value cache (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _decode(model: nn.Module, prompt: torch.Tensor, answers: torch.Tensor):
    """A prefill of all but the prompt's last token (the model's own attention, no LM head), then with eager
    attention read by :mod:`.attention_capture`: a teacher-forced chunk (the last prompt token and the answer) on a
    copy of the cache, and greedy decoding from the last prompt token.

    Returns (teacher top keys (B, L, H, T), teacher predictions (B, T), generate top keys (B, L, H, G), generated
    tokens (B, G)), with T the longest answer and G = T + EXTRA_STEPS."""
    device = next(model.parameters()).device
    prompt, answers = prompt.to(device), answers.to(device)
    cache = _cache_of(model(input_ids=prompt[:, :-1], use_cache=True, logits_to_keep=1))
    last = prompt[:, -1]
    with capture_attention(model, lambda w: w.argmax(-1).cpu()) as cap:
        forced = model(input_ids=torch.cat([last[:, None], answers[:, :-1]], 1),
                       **_with_cache(model, copy.deepcopy(cache)))
        teacher_top, teacher_pred = cap.stacked(), forced.logits.argmax(-1).cpu()
        cap.clear()
        gen_top, generated, token = [], [], last
        for _ in range(answers.shape[1] + EXTRA_STEPS):
            step = model(input_ids=token[:, None], **_with_cache(model, cache))
            cache, token = _cache_of(step), step.logits[:, -1].argmax(-1)
            gen_top.append(cap.stacked())
            generated.append(token)
            cap.clear()
    return teacher_top, teacher_pred, torch.cat(gen_top, -1), torch.stack(generated, 1).cpu()


def _until_eos(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """(B, G) mask of the steps up to and including the first EOS (all steps without one)."""
    if eos is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    after = (tokens == eos).long().cumsum(1) - (tokens == eos).long()
    return after == 0


def _recall(answer: list[int], generated: list[int]) -> float:
    """Share of the answer's distinct token ids among the generated ones (ROUGE-1 recall on token ids)."""
    return len(set(answer) & set(generated)) / len(set(answer))


def score_batch(model: nn.Module, prompts, eos: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Both variants' per-prompt scores and shuffled nulls (B, L, H), the model's teacher-forced token accuracy
    (B,) and its free answer's recall (B,), for prompts of one length (their ``ids`` all the same size)."""
    ids = torch.tensor([p.ids for p in prompts], dtype=torch.long)
    answers, amask, span = _batch_answers(prompts)
    t_top, t_pred, g_top, generated = _decode(model, ids, answers)
    full = torch.cat([ids, answers], 1)  # attended positions of the answer's own tokens may lie past the prompt
    gen_ids = torch.cat([ids, generated], 1)
    g_valid = _until_eos(generated, eos)
    recall = torch.tensor([_recall(p.answer, generated[i][g_valid[i]].tolist()) for i, p in enumerate(prompts)])
    return {
        "teacher": copied_share(t_top, answers, amask, full, span),
        "teacher_null": shuffled_share(t_top, answers, amask, full, span, seed=seed),
        "generate": copied_share(g_top, generated, g_valid, gen_ids, span),
        "generate_null": shuffled_share(g_top, generated, g_valid, gen_ids, span, seed=seed),
        "token_accuracy": ((t_pred == answers) & amask).sum(1).double() / amask.sum(1),
        "recall": recall.double(),
        "generated": generated,
    }


def _accuracy(prompts, token_acc: np.ndarray, recall: np.ndarray) -> dict:
    """The model's own retrieval: overall and per (length, depth)."""
    def summary(sel: np.ndarray) -> dict:
        return {"prompts": int(sel.sum()), "teacher_token_accuracy": float(token_acc[sel].mean()),
                "teacher_exact": float((token_acc[sel] == 1).mean()), "generate_recall": float(recall[sel].mean()),
                "generate_success": float((recall[sel] > 0.5).mean())}

    lengths, depths = np.array([p.length for p in prompts]), np.array([p.depth for p in prompts])
    cells = [{"length": int(n), "depth": float(d), **summary((lengths == n) & (depths == d))}
             for n in sorted(set(lengths)) for d in sorted(set(depths))]
    return {**summary(np.ones(len(prompts), dtype=bool)), "by_length_depth": cells}


def retrieval_scores(model: nn.Module, prompts, batch_size: int = 4, eos: int | None = None,
                     seed: int = 0) -> RetrievalResult:
    """Retrieval scores (both variants) of every head over needle prompts (see the module's docstring); prompts
    are batched by length, ``batch_size`` at a time."""
    require_causal_lm(model, "retrieval score")
    limit = getattr(model.config, "n_positions", None)  # learned absolute positions (GPT-2): a hard limit
    longest = max(len(p.ids) + len(p.answer) + EXTRA_STEPS for p in prompts)
    if limit is not None and longest > limit:
        raise InputError(f"needle prompts of {max(len(p.ids) for p in prompts)} tokens and their answers need "
                         f"{longest} positions; {model.config.model_type} has {limit}: pass shorter --lengths")
    by_length: dict[int, list] = {}
    for p in prompts:
        by_length.setdefault(len(p.ids), []).append(p)
    parts, order = [], []
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            parts.append(score_batch(model, group[i:i + batch_size], eos, seed))
            order += group[i:i + batch_size]
    cat = {k: torch.cat([part[k] for part in parts]).numpy() for k in parts[0] if k != "generated"}
    ok = cat["recall"] > 0.5
    mean_ok = lambda a: a[ok].mean(0) if ok.any() else np.full(a.shape[1:], np.nan)  # noqa: E731
    generated = [g.tolist() for part in parts for g in part["generated"]]
    rows = [{"length": p.length, "depth": p.depth, "needle": p.needle, "answer": p.answer, "generated": g,
             "teacher_token_accuracy": float(a), "generate_recall": float(r)}
            for p, g, a, r in zip(order, generated, cat["token_accuracy"], cat["recall"])]
    return RetrievalResult(cat["teacher"].mean(0), mean_ok(cat["generate"]), cat["teacher_null"].mean(0),
                           mean_ok(cat["generate_null"]), _accuracy(order, cat["token_accuracy"], cat["recall"]),
                           rows)
