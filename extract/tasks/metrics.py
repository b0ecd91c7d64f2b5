"""How well the model itself does a task, measured with the full model (LM head included).

``model_metric(loaded, task, examples)`` runs ``loaded.model(...)`` on right-padded batches in the ordinary way,
so hooks already on the model (an ablation that zeroes or mean-replaces some heads' z) change the result:
a lower ``metric`` under ablation means the ablated heads matter for the task. Every result holds a scalar
``metric`` and the ``chance`` level it is to be compared with.

- ``choice`` tasks: each example's ``choice`` asks the model to pick one of ``candidates`` after ``prompt``; a
  candidate's score is the summed log-probability of its tokens. ``metric`` is the share of distinct questions
  whose right candidate scores highest (chance 1 / number of candidates); ``margin`` is the mean score of the
  right candidate minus the best wrong one (for single-token candidates, as in IOI, this is the logit difference
  IO - S).
- ``induction`` tasks: ``metric`` is the top-1 accuracy of next-token prediction where the (current, next) token
  pair occurred earlier in the sequence, i.e. where copying from context predicts the next token; ``chance`` is
  the same accuracy where the next token is new to the context (what the model guesses without copying).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from headprobe import InputError
from headprobe.extract.models import LoadedModel
from headprobe.extract.tasks.base import Example, Task


def _token_ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []


def example_ids(tokenizer, ex: Example) -> list[int]:
    """The token ids the model reads for ``ex``: its own ``token_ids``, else its tokenized text."""
    return list(ex.token_ids) if ex.token_ids is not None else tokenizer(ex.text)["input_ids"]


def right_padded(seqs: list[list[int]], pad: int = 0, device: torch.device | str | None = None) -> dict:
    """Model inputs for token id lists of any lengths: ``input_ids`` and ``attention_mask``, (B, longest), padded
    on the right with ``pad``."""
    width = max(map(len, seqs))
    ids = torch.tensor([list(x) + [pad] * (width - len(x)) for x in seqs], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def token_logprobs(loaded: LoadedModel, seqs: list[list[int]], targets: list[np.ndarray], batch_size: int = 32
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run ``loaded.model`` over ``seqs`` (right-padded batches, sorted by length).

    ``targets[i]`` (n_i, K) holds token ids whose log-probability to read after each position of sequence i
    (-1: none). Returns per sequence the log-probabilities (n_i, K) (NaN where no target) and the top-1 predicted
    token id per position (n_i,; -1 where no sequence of the batch reads a target, if the model could skip the
    LM head there through ``logits_to_keep``).
    """
    model = loaded.model
    device = next(model.parameters()).device
    pad = getattr(loaded.tokenizer, "pad_token_id", None) or 0
    can_slice = "logits_to_keep" in inspect.signature(model.forward).parameters
    logp, top1 = [None] * len(seqs), [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width, k = max(len(seqs[i]) for i in idx), max(targets[i].shape[1] for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        want = torch.full((len(idx), width, k), -1, dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(seqs[i])
            ids[b, :n], mask[b, :n] = torch.tensor(seqs[i]), 1
            want[b, :n, :targets[i].shape[1]] = torch.as_tensor(targets[i])
        keep = torch.nonzero((want >= 0).any(-1).any(0))[:, 0]  # positions where some sequence reads a target
        kwargs = {"logits_to_keep": keep.to(device)} if can_slice and len(keep) < width else {}
        if not kwargs:
            keep = torch.arange(width)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits.float()  # (B, P, V)
        want = want[:, keep].to(device)  # (B, P, K)
        lp = logits.gather(-1, want.clamp(min=0)) - logits.logsumexp(-1, keepdim=True)
        lp = lp.masked_fill(want < 0, float("nan")).cpu().numpy()
        best = logits.argmax(-1).cpu().numpy()  # (B, P)
        for b, i in enumerate(idx):
            n, kk = len(seqs[i]), targets[i].shape[1]
            logp[i], top1[i] = np.full((n, kk), np.nan, np.float32), np.full(n, -1)
            inside = keep.numpy() < n
            logp[i][keep.numpy()[inside]] = lp[b, inside, :kk]
            top1[i][keep.numpy()[inside]] = best[b, inside]
    return logp, top1


def choice_questions(examples: list[Example]) -> list[dict]:
    """The distinct ``choice`` questions of ``examples``, in first-seen order (a true/false pair asks one)."""
    seen, out = set(), []
    for ex in examples:
        if ex.choice is None:
            continue
        key = (ex.choice["prompt"], tuple(ex.choice["candidates"]), ex.choice["answer"])
        if key not in seen:
            seen.add(key)
            out.append(ex.choice)
    return out


def choice_metric(loaded: LoadedModel, examples: list[Example], batch_size: int = 32) -> dict:
    questions = choice_questions(examples)
    if not questions:
        raise InputError("these examples ask the model nothing (no `choice`): use a task with a model metric")
    tok = loaded.tokenizer
    prompts = _token_ids(tok, [q["prompt"] for q in questions], special=True)
    cands = [_token_ids(tok, q["candidates"], special=False) for q in questions]
    # one sequence per distinct prompt + candidate[:-1]: candidates of one token share the prompt's forward
    seq_of, seqs, want = {}, [], []
    for p, cs in zip(prompts, cands):
        for c in cs:
            key = tuple(p + c[:-1])
            if key not in seq_of:
                seq_of[key] = len(seqs)
                seqs.append(list(key))
                want.append([])
            want[seq_of[key]].append((len(p) - 1, c))
    targets = []
    for seq, asks in zip(seqs, want):
        t = np.full((len(seq), len(asks)), -1)
        for j, (pos, c) in enumerate(asks):
            t[pos:pos + len(c), j] = c
        targets.append(t)
    logp, _ = token_logprobs(loaded, seqs, targets, batch_size)
    correct, margins = [], []
    for p, cs, q in zip(prompts, cands, questions):
        scores = []
        for c in cs:
            i = seq_of[tuple(p + c[:-1])]
            j = want[i].index((len(p) - 1, c))
            scores.append(np.nansum(logp[i][:, j]))
        scores = np.array(scores)
        best_wrong = np.delete(scores, q["answer"]).max()
        correct.append(scores[q["answer"]] > best_wrong)
        margins.append(scores[q["answer"]] - best_wrong)
    return {"metric": float(np.mean(correct)), "chance": float(np.mean([1 / len(q["candidates"]) for q in questions])),
            "margin": float(np.mean(margins)), "n": len(questions), "kind": "choice"}


def induction_metric(loaded: LoadedModel, examples: list[Example], batch_size: int = 32) -> dict:
    tok = loaded.tokenizer
    texts = _token_ids(tok, [ex.text for ex in examples if ex.token_ids is None], special=True)
    it = iter(texts)
    seqs = [list(ex.token_ids) if ex.token_ids is not None else next(it) for ex in examples]
    targets = [np.array(ids[1:] + [-1])[:, None] for ids in seqs]
    logp, best = token_logprobs(loaded, seqs, targets, batch_size)
    copy_hits, new_hits, copy_lp = [], [], []
    for ids, lp, top in zip(seqs, logp, best):
        hit, lp = top[:-1] == np.array(ids[1:]), lp[:, 0]
        pairs, seen = set(), set(ids[:1])
        for t in range(len(ids) - 1):
            pair = (ids[t], ids[t + 1])
            if pair in pairs:
                copy_hits.append(hit[t])
                copy_lp.append(lp[t])
            elif ids[t + 1] not in seen:
                new_hits.append(hit[t])
            pairs.add(pair)
            seen.add(ids[t + 1])
    if not copy_hits:
        raise InputError("no token in these examples repeats an earlier pair: the induction metric needs repeats")
    return {"metric": float(np.mean(copy_hits)), "chance": float(np.mean(new_hits)) if new_hits else 0.0,
            "copy_logprob": float(np.mean(copy_lp)), "n": len(copy_hits), "kind": "induction"}


METRICS = {"choice": choice_metric, "induction": induction_metric}


def model_metric(loaded: LoadedModel, task: Task, examples: list[Example] | None = None, batch_size: int = 32) -> dict:
    """The model's own performance on ``task`` (default: all its seed-0 examples); see the module docstring."""
    if task.metric not in METRICS:
        raise InputError(f"task {task.name!r} has no model metric (metric={task.metric!r})")
    return METRICS[task.metric](loaded, task.examples(0) if examples is None else examples, batch_size)


def probe_reads_after_scoring(task: Task, examples: list[Example]) -> bool:
    """True where a task's probes read a token the model metric does not score from: a ``choice`` task whose
    examples are read at their last token while their text runs past the choice prompt (true/false statements:
    the probe sees the answer, the margin scores the prediction of the answer at the prompt's end)."""
    return (task.metric == "choice" and task.position_rule == "last"
            and any(ex.choice is not None and ex.text != ex.choice["prompt"] for ex in examples))


def asked_to_judge(examples: list[Example], question: str = ". True or false? Answer:",
                   answers: tuple[str, str] = (" True", " False")) -> list[Example]:
    """True/false statements turned into questions to the model: each statement, then ``question``; its ``choice``
    is the right one of ``answers`` (answers[0] for a true statement, answers[1] for a false one). With
    :func:`choice_metric` this measures whether the model judges a finished statement, at the position after it
    (``bench/bench_judgement.py``)."""
    out = []
    for ex in examples:
        prompt = ex.text.rstrip(".") + question
        choice = {"prompt": prompt, "candidates": list(answers), "answer": 0 if ex.label == 1 else 1}
        out.append(Example(text=prompt, label=ex.label, group=ex.group, choice=choice))
    return out
