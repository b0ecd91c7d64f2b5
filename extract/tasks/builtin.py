"""Built-in tasks. Each is generated offline and deterministically from a seed."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from extract.tasks.base import Example, Task
from extract.tasks.corpus import make_corpus

DATA = Path(__file__).resolve().parents[2] / "datasets"


def _read_csv(rel: str) -> list[dict]:
    with open(DATA / rel, newline="") as f:
        return list(csv.DictReader(f))


def _capitals(seed: int) -> list[Example]:
    """Per country, one true and one false statement (a capital of another country)."""
    rows = _read_csv("facts/capitals.csv")
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        wrong = rng.choice([r["capital"] for j, r in enumerate(rows) if j != i])
        for capital, label in ((row["capital"], 1), (wrong, 0)):
            out.append(Example(text=f"The capital of {row['country']} is {capital}", label=label, group=row["country"]))
    return out


TASKS = [
    Task("corpus", "", "unlabelled English prose (Python manual and stdlib docstrings) for SAE training", [],
         make_corpus, position_rule="all", label_kind="none", card="cards/corpus.md"),
    Task("capitals", "KR", "true/false statements 'The capital of X is Y'", ["false", "true"], _capitals,
         card="cards/capitals.md"),
]
