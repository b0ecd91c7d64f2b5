"""Training-free scores on the real default model (SmolLM2-135M-Instruct), kept short: two needle prompts and 16
binary questions. What they pin down was measured on the full default settings (bench/bench_scores.py)."""
from __future__ import annotations

import numpy as np
import pytest

from headprobe.extract.models import DEFAULT_MODEL, load_model
from headprobe.extract.tasks.needle import needle_prompts
from headprobe.extract.tasks.yes_no import binary_questions
from headprobe.probes.checks.negative import negative_scores
from headprobe.probes.checks.retrieval import retrieval_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return load_model(DEFAULT_MODEL)


def _top(a: np.ndarray, k: int) -> list[tuple[int, int]]:
    return [divmod(int(i), a.shape[1]) for i in np.argsort(-np.nan_to_num(a, nan=-1).ravel())[:k]]


def test_the_default_models_strongest_induction_head_is_its_top_retrieval_head(loaded):
    prompts = needle_prompts(loaded.tokenizer, lengths=(256,), depths=(0.5,), n_needles=2)
    r = retrieval_scores(loaded.model, prompts, batch_size=2, eos=loaded.tokenizer.eos_token_id)
    assert r.accuracy["generate_success"] == 1.0  # it finds both needles
    assert _top(r.teacher, 1) == [(18, 6)] and r.teacher[18, 6] > 0.9  # L18.H6: induction score 0.87
    assert (18, 6) in _top(r.generate, 3) and r.generate[18, 6] > max(0.1, r.generate_null[18, 6])


def test_the_default_model_says_no_and_has_heads_for_either_candidate(loaded):
    r = negative_scores(loaded.model, binary_questions(loaded.tokenizer, 16), batch_size=16)
    assert r.answers["no_rate"] >= 0.75  # 95% "No" over 128 questions: the paper's negative bias
    assert r.score[16, 3] > 0.5 and r.score[22, 8] < -3  # the top "No" head and a strong "Yes" head
