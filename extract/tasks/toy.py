"""Synthetic sequences for the toy models (``headprobe toy train``) and their probing tasks.

A toy model reads a 64-symbol alphabet (``SYMBOLS``, token id = 3 + the symbol's index) after the special tokens
``<unk>`` (0, also padding), ``<s>`` (1, BOS) and ``</s>`` (2). Its tasks leave one mechanism to the heads:

- ``toy_induction`` (LR): ``[BOS, r1..rn, r1..rn]``, n distinct random symbols twice. Read at every token of the
  copy whose next token is predictable (r1..r(n-1)); label: the symbol that follows the current one's earlier
  occurrence, which is exactly what an induction head attends to and copies (Olsson et al. 2022).
- ``toy_previous`` (ICI): random symbols; read at every token from the second on; label: the previous symbol, what a
  previous-token head moves.
- ``toy_successor`` (LR, task-specific): the same sequences; label: the successor (next symbol of the alphabet,
  cyclically) of the previous symbol, what a head that attends to the previous token and maps it to its
  successor in its OV circuit writes (a successor head, Gould et al. 2023).

These tasks are not in ``headprobe.extract.tasks.TASKS`` (the default run's tasks): they speak only about models
trained on them. Name them explicitly: ``headprobe run --model FOLDER --tasks [toy_induction]``.
"""
from __future__ import annotations

import numpy as np

from headprobe.extract.tasks.base import Example, Task

SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ."
SPECIALS = ("<unk>", "<s>", "</s>")
UNK, BOS, EOS = 0, 1, 2
FIRST = len(SPECIALS)  # token id of SYMBOLS[0]
N_SYMBOLS = len(SYMBOLS)
VOCAB_SIZE = FIRST + N_SYMBOLS
LABEL_NAMES = [{" ": "space", ".": "dot"}.get(c, c) for c in SYMBOLS]


def successor(ids: np.ndarray) -> np.ndarray:
    """The token id of each symbol's successor in the alphabet (cyclic): ids (...) -> (...)."""
    return (np.asarray(ids) - FIRST + 1) % N_SYMBOLS + FIRST


def symbol_text(ids) -> str:
    """The symbols of token ids (special tokens dropped)."""
    return "".join(SYMBOLS[i - FIRST] for i in ids if i >= FIRST)


def distinct_symbols(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """(batch, n) token ids, n distinct random symbols per row."""
    if not 0 < n <= N_SYMBOLS:
        raise ValueError(f"{n} distinct symbols asked of an alphabet of {N_SYMBOLS}")
    return np.argsort(rng.random((batch, N_SYMBOLS)), axis=1)[:, :n] + FIRST


def repeated(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """(batch, 1 + 2n) token ids ``[BOS, r1..rn, r1..rn]``."""
    r = distinct_symbols(rng, batch, n)
    return np.concatenate([np.full((batch, 1), BOS), r, r], axis=1)


def periodic(rng: np.random.Generator, periods: np.ndarray, length: int) -> np.ndarray:
    """(B, length) token ids ``[BOS, r1..rn, r1..rn, r1..]`` cut at ``length``, with n = ``periods[b]`` distinct
    random symbols in row b."""
    B = len(periods)
    r = distinct_symbols(rng, B, int(periods.max()))
    cols = np.arange(length - 1)[None, :] % periods[:, None]  # (B, length - 1)
    return np.concatenate([np.full((B, 1), BOS), np.take_along_axis(r, cols, axis=1)], axis=1)


def random_symbols(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """(batch, length) token ids: BOS, then independent uniform symbols."""
    ids = rng.integers(FIRST, VOCAB_SIZE, size=(batch, length))
    ids[:, 0] = BOS
    return ids


def _induction_examples(seed: int, n: int = 240, lengths: tuple[int, int] = (12, 30)) -> list[Example]:
    """[BOS, r1..rn, r1..rn] with n in ``lengths``; rows at r1..r(n-1) of the copy, labelled by the next symbol."""
    rng, out = np.random.default_rng((seed, 23, 1)), []
    for i in range(n):
        k = int(rng.integers(lengths[0], lengths[1] + 1))
        ids = repeated(rng, 1, k)[0].tolist()
        labels: list[int | None] = [None] * len(ids)
        for j in range(1, k):  # the copy's r_j sits at 1 + k + j - 1; it is followed by r_(j+1)
            labels[k + j] = ids[1 + j] - FIRST
        out.append(Example(text=symbol_text(ids), token_ids=ids, token_labels=labels, group=f"seq{i}"))
    return out


def _previous_examples(seed: int, successor_of: bool, n: int = 240, length: int = 33) -> list[Example]:
    """Random symbols; rows from the second symbol on, labelled by the previous symbol (or its successor). The
    model is asked for the label at the last token (``choice``) against another symbol."""
    rng, out = np.random.default_rng((seed, 23, 2 + successor_of)), []
    for i, ids in enumerate(random_symbols(rng, n, length)):
        target = successor(ids[:-1]) if successor_of else ids[:-1]  # target[p - 1]: the label at position p
        labels = [None, None] + [int(t) - FIRST for t in target[1:]]
        text = symbol_text(ids)
        other = int(rng.choice([s for s in range(FIRST, VOCAB_SIZE) if s != target[-1]]))
        choice = {"prompt": text, "candidates": [SYMBOLS[target[-1] - FIRST], SYMBOLS[other - FIRST]], "answer": 0}
        out.append(Example(text=text, token_ids=ids.tolist(), token_labels=labels, group=f"seq{i}", choice=choice))
    return out


TASKS = [
    Task("toy_induction", "LR", "toy models: [BOS, r, r] random symbols; in the copy, the symbol after the "
         "current one's earlier occurrence", LABEL_NAMES, _induction_examples, position_rule="all",
         card="cards/toy.md", metric="induction"),
    Task("toy_previous", "ICI", "toy models: random symbols; the previous symbol", LABEL_NAMES,
         lambda seed: _previous_examples(seed, False), position_rule="all", card="cards/toy.md"),
    Task("toy_successor", "LR", "toy models: random symbols; the successor of the previous symbol", LABEL_NAMES,
         lambda seed: _previous_examples(seed, True), position_rule="all", card="cards/toy.md"),
]
