"""The last-layer readout metric of probes/readout.py on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest

from extract.tasks.base import Example
from probes.ablation import HeadAblation
from probes.readout import last_hidden, readout_metric
from tests.conftest import tiny_loaded


def first_letter_task(n: int, seed: int = 0) -> list[Example]:
    """Label = the first letter (a or b) of a text whose later letters are random: only attention reaches it."""
    rng = np.random.default_rng(seed)
    return [Example(text=("a" if y else "b") + "".join(rng.choice(list("cdefg"), 6)), label=int(y), group=f"g{i // 2}")
            for i, y in enumerate(rng.integers(0, 2, n))]


def test_last_hidden_reads_each_sequence_at_its_own_last_token():
    loaded = tiny_loaded("llama")
    ids = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    together = last_hidden(loaded.model, ids)  # padded into one batch
    alone = np.concatenate([last_hidden(loaded.model, [x]) for x in ids])
    assert together.shape == (3, 48)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_readout_falls_when_the_heads_that_carry_the_label_are_ablated():
    loaded = tiny_loaded("llama")
    examples = first_letter_task(240)
    score = examples[:60]  # cross-fit: each scored example's readout never saw its group
    metric = readout_metric(loaded.model, loaded.tokenizer, examples, score)
    clean = metric(loaded.model)
    assert clean.shape == (60,) and (clean <= 0).all()
    assert np.mean(np.exp(clean) > 0.5) > 0.9  # the clean readout gets the first letter from the last token's state
    every_head = [(layer, head) for layer in range(3) for head in range(6)]
    with HeadAblation(loaded.model, every_head, "zero"):
        ablated = metric(loaded.model)
    assert np.mean(np.exp(ablated) > 0.5) < 0.75  # without attention the last token cannot see the first letter
    assert ablated.mean() < clean.mean() - 0.3


def test_readout_is_fit_without_the_scored_groups():
    """A readout that saw its scored examples would score memorised noise labels well; a cross-fit one cannot."""
    loaded = tiny_loaded("llama")
    rng = np.random.default_rng(1)
    noise = [Example(text="".join(rng.choice(list("cdefgh"), 7)), label=int(rng.integers(0, 2)), group=f"g{i}")
             for i in range(120)]
    logp = readout_metric(loaded.model, loaded.tokenizer, noise, noise[:40], Cs=(1.0,))(loaded.model)
    assert abs(np.mean(np.exp(logp) > 0.5) - 0.5) < 0.15  # chance; fit on all 120 at C=1, 35 of the 40 are right


def test_readout_refuses_examples_it_cannot_use():
    loaded = tiny_loaded("llama")
    good = first_letter_task(20)
    with pytest.raises(ValueError, match="one label only"):
        readout_metric(loaded.model, loaded.tokenizer, [ex for ex in good if ex.label == 1], good)
    with pytest.raises(ValueError, match="texts and labels"):
        readout_metric(loaded.model, loaded.tokenizer, good, [Example(text="abc")])
    with pytest.raises(ValueError, match="lacks a label"):
        readout_metric(loaded.model, loaded.tokenizer, good, [Example(text="abc", label=2, group=g) for g in "xy"])
    with pytest.raises(ValueError, match="one group"):
        readout_metric(loaded.model, loaded.tokenizer, good, good[:2])
