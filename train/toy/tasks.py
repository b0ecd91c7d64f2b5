"""The toy models' training tasks: synthetic batches whose targets leave one mechanism to the heads.

Each :class:`ToyTask` turns a seeded generator into a :class:`ToyBatch` (token ids, a target per position, and
masks that name the positions a curve is measured on), and has a fixed evaluation batch for the training curves.
Targets need not be the next token: the logits at position p are trained to predict ``targets[:, p]``.

- ``induction``: ``[BOS, r1..rn, r1..rn, r1..]`` (n distinct random symbols repeated up to the sequence length, n
  drawn per row between ``n_min`` and ``n_max``); target: the next token. Only an earlier occurrence of the current
  token tells the next one, and as n varies no fixed offset does: a previous-token head plus an induction head
  (Olsson et al. 2022). Curves: the canonical ``[BOS, r1..r50, r1..r50]``, loss on the first copy's predictions
  (r2..r50, unpredictable) and the second copy's (r2..r50, predictable by induction).
- ``previous_token``: random symbols; target at p: the token at p - 1 (a previous-token head that copies).
- ``successor``: random symbols; target at p: the successor of the token at p - 1 (a previous-token head whose OV
  circuit maps a symbol to the next symbol of the alphabet, cyclically).

Add a task: write a ``make(rng, batch, seq_len, n_min, n_max) -> ToyBatch`` and an ``evaluate(seed) -> ToyBatch``,
add ``ToyTask(...)`` to ``TASKS`` with the name of its probing task (``headprobe.extract.tasks.toy``), and a config
``train/configs/toy_NAME.yaml`` (docs/toy-models.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from headprobe.extract.tasks.toy import periodic, random_symbols, repeated, successor

IGNORE = -100  # targets with this value are not trained on
EVAL_N = 50  # repeated symbols of the canonical induction sequence (as the attention-pattern scores use)


@dataclass
class ToyBatch:
    """ids (B, S) and targets (B, S) int64 (``IGNORE`` where untrained); masks {name: (B, S) bool}: the
    positions each curve averages the loss over."""

    ids: torch.Tensor
    targets: torch.Tensor
    masks: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ToyTask:
    name: str
    description: str
    probing_task: str  # its probing task in headprobe.extract.tasks.TOY_TASKS
    make: Callable[[np.random.Generator, int, int, int, int], ToyBatch]  # (rng, batch, seq_len, n_min, n_max)
    evaluate: Callable[[int], ToyBatch]  # seed -> the fixed evaluation batch
    jobs: tuple[str, ...]  # the head scores its mechanism needs some head to reach (see train/toy/record.py)


def _batch(ids: np.ndarray, targets: np.ndarray, masks: dict[str, np.ndarray]) -> ToyBatch:
    return ToyBatch(torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(targets, dtype=torch.long),
                    {k: torch.as_tensor(v, dtype=torch.bool) for k, v in masks.items()})


def _next_token_targets(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([ids[:, 1:], np.full((len(ids), 1), IGNORE)], axis=1)


def _induction(rng: np.random.Generator, batch: int, seq_len: int, n_min: int, n_max: int) -> ToyBatch:
    periods = rng.integers(n_min, n_max + 1, size=batch)
    ids = periodic(rng, periods, seq_len)
    pos = np.arange(seq_len)[None, :]  # position p holds r_((p - 1) % n + 1); it was seen before from p = n + 1
    first = (pos >= 1) & (pos < periods[:, None])
    second = (pos > periods[:, None]) & (pos < seq_len - 1)
    return _batch(ids, _next_token_targets(ids), {"first": first, "second": second})


def _induction_eval(seed: int, batch: int = 16) -> ToyBatch:
    ids = repeated(np.random.default_rng((seed, 23, 0)), batch, EVAL_N)  # (B, 1 + 2n)
    pos = np.arange(ids.shape[1])[None, :].repeat(batch, 0)
    first = (pos >= 1) & (pos < EVAL_N)  # r1..r(n-1) of the first copy, predicting r2..rn
    second = (pos > EVAL_N) & (pos < 2 * EVAL_N)  # r1..r(n-1) of the copy
    return _batch(ids, _next_token_targets(ids), {"first": first, "second": second})


def _previous(successor_of: bool) -> tuple[Callable, Callable]:
    def make(rng: np.random.Generator, batch: int, seq_len: int, n_min: int = 0, n_max: int = 0) -> ToyBatch:
        ids = random_symbols(rng, batch, seq_len)
        prev = successor(ids[:, :-1]) if successor_of else ids[:, :-1]
        targets = np.concatenate([np.full((batch, 2), IGNORE), prev[:, 1:]], axis=1)  # not at BOS, nor right after
        return _batch(ids, targets, {"all": targets != IGNORE})

    def evaluate(seed: int, batch: int = 16) -> ToyBatch:
        return make(np.random.default_rng((seed, 23, 0)), batch, 2 * EVAL_N + 1)
    return make, evaluate


TASKS = {
    "induction": ToyTask("induction", "repeated random symbols; target: the next token", "toy_induction",
                         _induction, _induction_eval, ("previous_token", "induction")),
    "previous_token": ToyTask("previous_token", "random symbols; target: the previous token", "toy_previous",
                              *_previous(False), ("previous_token", "copy")),
    "successor": ToyTask("successor", "random symbols; target: the successor of the previous token",
                         "toy_successor", *_previous(True), ("previous_token", "successor")),
}
