"""The last-layer readout metric of probes/readout.py on tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headprobe.extract.tasks.base import Example
from headprobe.probes.checks.ablation import HeadAblation
from headprobe.probes.checks.readout import last_hidden, readout_metric
from helpers import tiny_loaded


def first_letter_task(n: int, seed: int = 0) -> list[Example]:
    """Label = the first letter (a or b) of a text whose later letters are random: only attention reaches it."""
    rng = np.random.default_rng(seed)
    return [Example(text=("a" if y else "b") + "".join(rng.choice(list("cdefg"), 6)), label=int(y), group=f"g{i // 2}")
            for i, y in enumerate(rng.integers(0, 2, n))]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_last_hidden_reads_each_sequence_at_its_own_last_token(family):
    loaded = tiny_loaded(family)
    ids = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    together = last_hidden(loaded.model, ids)  # padded into one batch
    alone = np.concatenate([last_hidden(loaded.model, [x]) for x in ids])
    assert together.shape == (3, loaded.model.config.hidden_size)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    with torch.no_grad():  # after the last norm: what the LM head reads
        logits = loaded.model(input_ids=torch.tensor([ids[0]])).logits[0, -1].double().numpy()
    head = loaded.model.get_output_embeddings()
    bias = 0 if head.bias is None else head.bias.detach().double().numpy()
    np.testing.assert_allclose(together[0] @ head.weight.detach().double().numpy().T + bias, logits, atol=1e-4)


def test_readout_falls_when_the_heads_that_carry_the_label_are_ablated():
    loaded = tiny_loaded("llama")
    examples = first_letter_task(240)
    scored = examples[:60]  # cross-fit: each scored example's readout never saw its group
    metric = readout_metric(loaded.model, loaded.tokenizer, examples, scored)
    clean = metric(loaded.model)
    assert clean.shape == (60,) and (clean <= 0).all()
    assert np.mean(np.exp(clean) > 0.5) > 0.9  # the clean readout gets the first letter from the last token's state
    every_head = [(layer, head) for layer in range(3) for head in range(6)]
    with HeadAblation(loaded.model, every_head, "zero"):
        ablated = metric(loaded.model)
    assert np.mean(np.exp(ablated) > 0.5) < 0.75  # without attention the last token cannot see the first letter
    assert ablated.mean() < clean.mean() - 0.3


def test_readout_is_fit_without_the_scored_groups():
    """Noise labels, each on two copies of one text (a group): a readout that trained on a scored text's group
    scores its memorised label well; the cross-fit one is at chance."""
    loaded = tiny_loaded("llama")
    rng = np.random.default_rng(1)
    texts, labels = ["".join(rng.choice(list("cdefgh"), 7)) for _ in range(60)], rng.integers(0, 2, 60)
    noise = [Example(text=t, label=int(y), group=f"g{i}") for i, (t, y) in enumerate(zip(texts, labels))
             for _ in range(2)]
    scored = noise[::2][:40]

    def accuracy(scored: list[Example]) -> float:
        logp = readout_metric(loaded.model, loaded.tokenizer, noise, scored, Cs=(1.0,))(loaded.model)
        return float(np.mean(np.exp(logp) > 0.5))

    leaky = [Example(text=ex.text, label=ex.label, group="other" + ex.group) for ex in scored]  # group not excluded
    assert accuracy(leaky) > 0.75  # the readout saw the scored texts: the check below could fail
    assert abs(accuracy(scored) - 0.5) < 0.15


def test_readout_refuses_examples_it_cannot_use():
    loaded = tiny_loaded("llama")
    good = first_letter_task(20)
    with pytest.raises(ValueError, match="one label only"):
        readout_metric(loaded.model, loaded.tokenizer, [ex for ex in good if ex.label == 1], good)
    with pytest.raises(ValueError, match="texts .or token ids. and labels"):
        readout_metric(loaded.model, loaded.tokenizer, good, [Example(text="abc")])
    with pytest.raises(ValueError, match=r"scored labels \[2\] are in none"):
        readout_metric(loaded.model, loaded.tokenizer, good, [Example(text="abc", label=2, group=g) for g in "xy"])
    with pytest.raises(ValueError, match="lacks a label"):  # the only label-1 examples share the scored group
        lonely = [Example(text="abc", label=1, group="x")] + [Example(text="cd", label=0, group=f"y{i}") for i in
                                                               range(12)]
        readout_metric(loaded.model, loaded.tokenizer, lonely, [lonely[0], lonely[1]])
    with pytest.raises(ValueError, match="one group"):
        readout_metric(loaded.model, loaded.tokenizer, good, good[:2])
