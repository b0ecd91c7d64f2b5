"""Built-in tasks: registry, determinism, split leakage, token labels, the model metric, `headprobe tasks`."""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch

from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.hooks import out_projections
from headprobe.extract.store import Store
from headprobe.extract.tasks import STAGES, TASKS, assign_splits, get_task
from headprobe.extract.tasks.builtin import DATA, _category_words, next_word_category
from headprobe.extract.tasks.metrics import choice_metric, model_metric, probe_reads_after_scoring
from headprobe.train.cli import main as headprobe
from helpers import ByteTokenizer, tiny_loaded

LABELLED = [name for name, task in TASKS.items() if task.stage]


def test_registry_covers_every_stage_with_cards():
    per_stage = {s: [n for n in LABELLED if TASKS[n].stage == s] for s in STAGES}
    assert all(len(v) >= 2 for v in per_stage.values()), per_stage
    assert len(LABELLED) >= 8
    for name in LABELLED:
        task = TASKS[name]
        card = (DATA / task.card).read_text()
        assert re.search(r"above chance: (yes|no)", card), f"{task.card} states no measured model performance"
        examples = task.examples(0)
        labels = [y for ex in examples for y in ([ex.label] if ex.token_labels is None else ex.token_labels)
                  if y is not None]
        assert task.token_labeler or set(labels) == set(range(len(task.label_names))), name


def test_headprobe_tasks_lists_all(capsys):
    headprobe(["tasks"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:] if line and not line.startswith(" ")]
    assert {r[0] for r in rows} == set(TASKS)
    assert {r[1] for r in rows} >= set(STAGES)
    for r in rows:
        assert int(r[2]) == len(TASKS[r[0]].examples(0)) and r[-1] == f"datasets/{TASKS[r[0]].card}"


@pytest.mark.parametrize("name", LABELLED)
def test_examples_are_deterministic_and_seeded(name):
    task = TASKS[name]
    a = task.examples(0)
    assert a == task.examples(0)
    if name != "facts":  # facts are a fixed list; every other task draws something from the seed
        assert a != task.examples(1)


@pytest.mark.parametrize("name", [*LABELLED, "corpus"])
def test_no_group_or_question_in_two_splits(name):
    task = TASKS[name]
    examples = task.examples(0)
    splits = assign_splits([ex.group for ex in examples], task.split_fractions, seed=0)
    assert set(splits.tolist()) == {0, 1, 2}
    for key in ("group", "question"):
        where = {}
        for ex, s in zip(examples, splits):
            k = ex.group if key == "group" else (ex.choice or {}).get("prompt", ex.group)
            where.setdefault(k, set()).add(int(s))
        assert all(len(v) == 1 for v in where.values()), f"a {key} of {name} is in two splits"


def test_same_seed_same_store_bytes(tmp_path):
    """Two extractions of one task with one seed write identical datasets; another seed writes other ones."""
    loaded = tiny_loaded("llama")
    cfg = ExtractConfig(max_examples=12)
    paths = [extract(loaded, get_task("ioi"), tmp_path / f"{i}.h5", cfg, progress=False) for i in range(2)]
    other = extract(loaded, get_task("ioi"), tmp_path / "s1.h5", ExtractConfig(max_examples=12, seed=1),
                    progress=False)

    def contents(path):
        with h5py.File(path) as f:
            return {k: f[k][()].tobytes() for k in f if isinstance(f[k], h5py.Dataset)}

    assert contents(paths[0]) == contents(paths[1])
    assert Store(paths[0]).meta.dataset_hash == Store(paths[1]).meta.dataset_hash != Store(other).meta.dataset_hash
    assert contents(paths[0])["z"] != contents(other)["z"]


def test_repeat_tokens_labels_each_copied_word_by_the_next_words_category(tmp_path):
    """Byte tokens (a word is several tokens): a row only at the last token of each copied word whose successor
    pair occurred before, labelled by that successor's category; every other token has no row."""
    task = get_task("repeat_tokens")
    examples = task.examples(0)[:3]
    store = Store(extract(tiny_loaded("llama"), task, tmp_path / "r.h5", ExtractConfig(max_examples=3),
                          progress=False))
    category = _category_words()
    ex_id, pos, labels = store.column("example_id"), store.column("position"), store.labels
    for e, ex in enumerate(examples):
        words = ex.text.split()
        n = len(words) // 2
        assert words[:n] == words[n:] and len(set(words[:n])) == n
        ends = np.cumsum([len(w) + 1 for w in words]) - 1  # BOS + bytes: the last byte of word k is at ends[k]
        # the first word has no leading space, so its pair with the second word is only found in the copy
        copied = range(n + 1, 2 * n - 1)
        assert pos[ex_id == e].tolist() == [int(ends[k]) for k in copied]
        assert labels[ex_id == e].tolist() == [category[words[k + 1]] for k in copied]
    assert 0 < labels.mean() < 1


def test_next_word_category_needs_an_earlier_pair():
    tok = ByteTokenizer()
    ids = tok(" cat bread cat rice cat bread")["input_ids"]  # "cat" is followed by "rice" once, then "bread" again
    labels = next_word_category(ids, tok)
    assert [(p, y) for p, y in enumerate(labels) if y is not None] == [(len(" cat bread cat rice cat") - 1, 1)]


def test_choice_metric_matches_a_direct_logit_difference():
    """For one-token candidates the margin is logit(right) - logit(wrong) at the prompt's last token, and
    zeroing every head's output (an ablation hook) changes it."""
    loaded = tiny_loaded("llama")
    ex = get_task("ioi").examples(0)[:4]
    tok, model = loaded.tokenizer, loaded.model
    diffs = []
    for q in [e.choice for e in ex]:
        prompt = tok(q["prompt"])["input_ids"]
        scores = []
        for cand in q["candidates"]:  # byte tokens: a name is several tokens; the metric sums their log-probs
            c = tok(cand, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + c])).logits[0].float(), -1)
            scores.append(sum(float(logp.detach()[len(prompt) - 1 + j, t]) for j, t in enumerate(c)))
        diffs.append(scores[0] - scores[1])
    result = choice_metric(loaded, ex)
    assert result["margin"] == pytest.approx(np.mean(diffs), abs=1e-4)
    assert result["metric"] == np.mean(np.array(diffs) > 0) and result["chance"] == 0.5

    handle = out_projections(model)[0].register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    try:
        ablated = choice_metric(loaded, ex)
    finally:
        handle.remove()
    assert ablated["margin"] != pytest.approx(result["margin"], abs=1e-4)


def test_induction_metric_runs_on_a_tiny_model():
    result = model_metric(tiny_loaded("llama"), get_task("repeat_tokens"), get_task("repeat_tokens").examples(0)[:4])
    assert result["n"] > 20 and 0 <= result["metric"] <= 1 and 0 <= result["chance"] <= 1


def test_corpus_has_no_model_metric():
    with pytest.raises(ValueError, match="no model metric"):
        model_metric(tiny_loaded("gpt2"), get_task("corpus"), [])


def test_probe_position_against_the_scored_position():
    """True/false statements are probed at the answer, which the model metric scores from the token before; IOI
    and sentiment are probed where the metric is scored, and the copy task at the tokens it scores."""
    after = {name for name, task in TASKS.items() if task.metric != "none"
             and probe_reads_after_scoring(task, task.examples(0))}
    assert after == {"capitals", "city_country", "arithmetic", "successor", "greater_than", "facts"}
