"""The unlabelled `corpus` task: offline, deterministic, grouped by source, extractable."""
from __future__ import annotations

import numpy as np

from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.store import Store
from headprobe.extract.tasks import Task, get_task
from headprobe.extract.tasks.corpus import make_corpus
from helpers import tiny_loaded


def test_corpus_is_large_deterministic_and_bounded():
    task = get_task("corpus")
    assert (task.stage, task.label_kind, task.position_rule) == ("", "none", "all")
    a, b = task.examples(0), task.examples(0)
    assert a == b and a != task.examples(1)
    assert sorted(e.text for e in a) == sorted(e.text for e in task.examples(1))  # a seed only reorders
    chars = np.array([len(e.text) for e in a])
    assert chars.max() <= 400 and chars.sum() > 1_200_000  # ~300k tokens at ~4.4 characters per token
    assert len({e.group for e in a}) > 300 and all(e.label is None for e in a)


def test_corpus_extracts_with_missing_labels(tmp_path):
    task = Task("c", "", "", [], lambda s: make_corpus(s, max_chars=100), position_rule="all", label_kind="none")
    store = Store(extract(tiny_loaded("llama"), task, tmp_path / "c.h5", ExtractConfig(max_examples=6),
                          progress=False))
    n_tokens = sum(len(e.text.encode()) + 1 for e in task.examples(0)[:6])
    assert store.shape[0] == n_tokens
    assert (store.labels == -1).all()
