"""What a probing task is: labelled examples, the token position to read, a reasoning stage, leakage groups."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

STAGES = {
    "KR": "Knowledge Recalling",
    "ICI": "In-Context Identification",
    "LR": "Latent Reasoning",
    "EP": "Expression Preparation",
}
POSITION_RULES = ("last", "all", "task")


@dataclass
class Example:
    """One prompt. Give ``text`` or pre-tokenised ``token_ids``.

    ``position`` is the token index to read under the "task" rule (negative counts from the end).
    ``token_labels`` gives a label per token under the "all" rule (else every row gets ``label``); a token whose
    label is None gets no row.
    ``choice`` is what the model itself is asked, for measuring its own performance (see ``metrics.py``):
    ``{"prompt": str, "candidates": [str, ...], "answer": index of the right candidate}``.
    """

    text: str | None = None
    label: int | float | None = None
    group: str = ""
    position: int | None = None
    token_ids: list[int] | None = None
    token_labels: list[int | None] | None = None
    choice: dict | None = None


@dataclass
class Task:
    name: str
    stage: str  # one of STAGES, or "" for unlabelled text
    description: str
    label_names: list[str]
    make: Callable[[int], list[Example]]  # seed -> examples, deterministic
    position_rule: str = "last"
    label_kind: str = "class"  # "class", "regression" or "none"
    card: str = ""  # path of the dataset card, relative to the repository's datasets/
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    extra: dict = field(default_factory=dict)
    token_labeler: Callable[[list[int], object], list[int | None]] | None = None  # (ids, tokenizer) -> label per token
    metric: str = "choice"  # how the model's own performance is measured: "choice", "induction" or "none"

    def examples(self, seed: int = 0) -> list[Example]:
        return self.make(seed)


def dataset_hash(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(asdict(ex), sort_keys=True).encode())
    return h.hexdigest()[:16]


def assign_splits(groups: list[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                  seed: int = 0) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per example; all examples of a group land in one split."""
    unique = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.cumsum(np.asarray(fractions) / sum(fractions))[:2] * len(unique)
    split_of = {unique[j]: int(np.searchsorted(cuts, rank, side="right")) for rank, j in enumerate(perm)}
    return np.array([split_of[g] for g in groups], dtype=np.int8)
