"""Every built-in task on the real default model: it extracts, and the model does it as its card says."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.store import Store
from headprobe.extract.tasks import TASKS
from headprobe.extract.tasks.builtin import DATA
from headprobe.extract.tasks.metrics import asked_to_judge, choice_metric, model_metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    """The default model, run on one thread: on a shared 2-core machine two threads ran ~6x slower."""
    from headprobe.extract.models import load_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("smollm2-135m")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_extracts_on_the_default_model(smollm, name, tmp_path):
    task = TASKS[name]
    layers = [15] if name == "corpus" else None
    store = Store(extract(smollm, task, tmp_path / "s.h5", ExtractConfig(max_examples=16, layers=layers),
                          progress=False))
    rows, n_layers, n_heads, d_head = store.shape
    assert (n_layers, n_heads, d_head) == ((1 if layers else 30), 9, 64)
    assert np.isfinite(store.activations(np.arange(min(rows, 64))).astype(np.float32)).all()
    labels = store.labels
    if task.label_kind == "none":
        assert (labels == -1).all()
    else:
        assert set(labels.tolist()) <= set(range(len(task.label_names))) and len(set(labels.tolist())) == 2
    if name == "repeat_tokens":  # both categories follow copied words about equally often
        assert 0.3 < labels.mean() < 0.7


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items() if t.metric != "none"))
def test_model_is_above_chance_where_its_card_says_so(smollm, name):
    task = TASKS[name]
    claim = re.search(r"above chance: (yes|no)", (DATA / task.card).read_text()).group(1)
    result = model_metric(smollm, task, task.examples(0)[:6 if task.metric == "induction" else 40])
    assert result["n"] >= 20
    if claim == "yes":
        assert result["metric"] > result["chance"] + 0.05, result


def test_asked_to_judge_capitals_statements_the_default_model_says_true_to_all(smollm):
    """The README's reason why no ablation metric sits at the true/false tasks' answer token: asked, the model
    answers True whatever the statement (bench/bench_judgement.py measures all six tasks)."""
    examples = TASKS["capitals"].examples(0)[:40]
    asked = asked_to_judge(examples)
    assert asked[0].choice["prompt"].endswith(". True or false? Answer:") and asked[0].text == asked[0].choice["prompt"]
    assert [ex.choice["answer"] for ex in asked] == [0 if ex.label == 1 else 1 for ex in examples]
    on_true = choice_metric(smollm, [ex for ex in asked if ex.label == 1])
    on_false = choice_metric(smollm, [ex for ex in asked if ex.label == 0])
    assert on_true["n"] == on_false["n"] == 20
    assert on_true["metric"] == 1.0 and on_false["metric"] <= 0.1, (on_true, on_false)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_asked_in_chat_keeps_one_bos_when_the_template_writes_it(adds_bos):
    import importlib.util
    from pathlib import Path

    from headprobe.extract.tasks import Example
    from helpers import byte_tokenizer

    path = Path(__file__).parents[1] / "bench" / "bench_judgement.py"
    spec = importlib.util.spec_from_file_location("bench_judgement", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = byte_tokenizer(bos=adds_bos)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    asked = bench.asked_in_chat(tok, [Example(text="Paris is in France.", label=1)], "Q: {statement}",
                                ("True", "False"))
    ids = tok(asked[0].choice["prompt"])["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert asked[0].choice["prompt"].endswith("[Q: Paris is in France.]>") and asked[0].choice["answer"] == 0
