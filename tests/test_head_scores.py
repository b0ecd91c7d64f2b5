"""Attention-pattern scores: exact on hand-set patterns, and a planted previous-token head in a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headprobe.probes.checks.head_scores import (attention_patterns, copy_carriers, detection_patterns,
                                                 head_type_scores, head_types, pattern_scores, rank_agreement,
                                                 repeated_random_tokens, top_overlap, typed_auroc)
from helpers import tiny_model

N = 10


def test_repeated_tokens_layout():
    t = repeated_random_tokens(n=N, batch=3, vocab_size=50, bos=1, low=5, seed=0)
    assert t.shape == (3, 1 + 2 * N)
    assert (t[:, 0] == 1).all() and torch.equal(t[:, 1:N + 1], t[:, N + 1:])
    assert (t[:, 1:] >= 5).all() and all(len(set(row[1:N + 1].tolist())) == N for row in t)
    with pytest.raises(ValueError, match="46 distinct tokens asked from the 45 ids"):
        repeated_random_tokens(n=46, vocab_size=50, low=5)


def test_scores_of_hand_set_patterns():
    tokens = repeated_random_tokens(n=N, batch=2, vocab_size=100, bos=0, low=1, seed=1)
    S = tokens.shape[1]
    eye = lambda offset: torch.diag(torch.ones(S - abs(offset)), offset)
    prev = eye(-1)
    prev[0, 0] = 1  # BOS attends to itself
    dup = eye(-N)
    dup[: N + 1] = prev[: N + 1]  # first half: previous token
    induction = eye(1 - N)
    induction[: N] = prev[: N]
    uniform = torch.tril(torch.ones(S, S))
    uniform /= uniform.sum(1, keepdim=True)
    heads = torch.stack([prev, dup, induction, uniform])  # (4, S, S)
    attn = heads[None, None].expand(2, 1, 4, S, S)  # (B, L=1, H=4, S, S)
    s = pattern_scores(attn, tokens, n=N)
    np.testing.assert_allclose(s["previous_token"][0], [1, 0, 0, s["previous_token"][0, 3]], atol=1e-12)
    np.testing.assert_allclose(s["duplicate_token"][0, :3], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(s["induction"][0, :3], [0, 0, 1], atol=1e-12)
    # uniform attention over the i+1 visible keys: each pattern holds one key per query of the second half
    q = torch.arange(N + 1, S, dtype=torch.float64)
    expected = float((1 / (q + 1)).mean())
    for name in ("previous_token", "duplicate_token", "induction"):
        assert s[name][0, 3] == pytest.approx(expected)
    # induction is also the mean of the diagonal at offset 1 - n over the second half
    assert float(torch.diagonal(induction, 1 - N)[1:].mean()) == pytest.approx(s["induction"][0, 2])
    assert head_types(s) == {(0, 0): ["previous_token"], (0, 1): ["duplicate_token"], (0, 2): ["induction"]}


def test_detection_patterns_follow_the_tokens():
    tokens = torch.tensor([[5, 7, 5, 9, 7]])
    p = detection_patterns(tokens)
    assert p["duplicate_token"][0].nonzero().tolist() == [[2, 0], [4, 1]]
    assert p["induction"][0].nonzero().tolist() == [[2, 1], [4, 2]]
    assert p["previous_token"][0].nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]


def previous_token_qwen2():
    """A tiny Qwen2 whose head 0 of layer 1 attends to the previous token: q and k are constant (zero weights, set
    biases), chosen through RoPE so that the score of key j for query i peaks at i - j = 1."""
    model = tiny_model("qwen2", attn="sdpa")  # 2 layers, 4 heads, 2 KV heads, d_head 8
    attn = model.model.layers[1].self_attn
    D = attn.head_dim
    inv_freq = model.model.rotary_emb.inv_freq  # (D/2,)
    k = torch.zeros(D)
    k[[0, 1, D // 2, D // 2 + 1]] = 12.0  # the two fastest rotating pairs
    # q = R(-1) k: with HF's rotate-half layout, the pair (x_i, x_{i + D/2}) rotates by angle pos * inv_freq[i]
    ang = torch.cat([inv_freq, inv_freq]) * -1.0
    rot = torch.cat([-k[D // 2:], k[: D // 2]])
    q = k * ang.cos() + rot * ang.sin()
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        attn.q_proj.bias[:D] = q  # query head 0
        attn.k_proj.bias[:D] = k  # kv head 0 (shared by query heads 0 and 1)
    return model


def test_planted_previous_token_head_in_a_tiny_model():
    model = previous_token_qwen2()
    scores = head_type_scores(model, n=20, batch=4, bos=1, vocab_size=300)
    assert model.config._attn_implementation == "sdpa"  # switched back after measuring
    prev = scores["previous_token"]
    assert prev.shape == (2, 4)
    assert prev[1, 0] > 0.9
    others = np.delete(prev.ravel(), 4)
    assert others.max() < 0.4
    assert head_types(scores).get((1, 0)) == ["previous_token"]
    assert (scores["induction"] < 0.4).all()


def test_attention_patterns_are_probabilities():
    model = tiny_model("gpt2")
    tokens = repeated_random_tokens(n=5, batch=2, vocab_size=300, bos=None, low=3, seed=0)
    a = attention_patterns(model, tokens)
    assert a.shape == (2, 3, 4, 10, 10)
    np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-5)
    assert torch.all(a.triu(1) == 0)  # causal


def test_top_overlap_counts_shared_top_heads():
    a = np.arange(12.0).reshape(3, 4)
    b = a.copy()
    b[2, 3], b[0, 0] = -1.0, 99.0  # a's best head drops to the bottom, its worst one goes to the top
    assert top_overlap(a, a, 3) == 3 and top_overlap(a, b, 3) == 2 and top_overlap(a, -a, 3) == 0
    a[2, 2] = np.nan  # NaN ranks lowest
    assert top_overlap(a, b, 3) == 1


def test_typed_auroc_ranks_the_typed_heads_against_the_rest():
    pattern = np.zeros((2, 3))
    pattern[1, 0], pattern[0, 2] = 0.9, 0.5  # two heads typed (> 0.4)
    score = np.array([[0.1, 0.2, 0.8], [0.7, 0.3, 0.75]])  # typed: 0.8, 0.7; untyped: 0.1, 0.2, 0.3, 0.75
    assert typed_auroc(score, pattern) == pytest.approx(7 / 8)  # 0.7 loses to 0.75 once in 8 pairs
    assert typed_auroc(-score, pattern) == pytest.approx(1 / 8)
    score[0, 2] = np.nan  # NaN ranks lowest
    assert typed_auroc(score, pattern) == pytest.approx(3 / 8)
    assert np.isnan(typed_auroc(score, np.zeros((2, 3))))  # no typed head: undefined


@pytest.mark.slow
def test_copy_task_probes_find_the_induction_heads_of_the_default_model(tmp_path):
    """repeat_tokens on SmolLM2: per-head linear probes for the next word's category (val + test accuracy) against
    the attention-pattern induction scores over all 270 heads. Measured: Spearman rho 0.31, the top-5 heads of
    both rankings identical, AUROC 0.99 for the heads typed induction (score > 0.4). The issue's goal (rho >= 0.5)
    is not met: heads after layer 18 read the copied word from the residual stream (accuracy 0.55-0.75) while
    their induction scores are ~0."""
    from sklearn.metrics import roc_auc_score

    from headprobe.extract.extractor import ExtractConfig, extract
    from headprobe.extract.models import load_model
    from headprobe.extract.store import Store
    from headprobe.extract.tasks import get_task
    from headprobe.probes.newton import fit_newton

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model("smollm2-135m")
        store = Store(extract(loaded, get_task("repeat_tokens"), tmp_path / "r.h5", ExtractConfig(), progress=False))
        z = torch.from_numpy(np.asarray(store.activations(np.arange(store.shape[0]))).astype(np.float64))
        N, L, H, D = z.shape
        x, y = z.reshape(N, L * H, D), torch.from_numpy(store.labels).double()
        fit, held = store.rows("train"), np.concatenate([store.rows("val"), store.rows("test")])
        W, _ = fit_newton(x[fit], y[fit, None], "logistic")
        logits = torch.einsum("npf,pf->np", x[held], W[0, :, :D, 0]) + W[0, :, D, 0]  # (N_held, L*H)
        acc = ((logits > 0).double() == y[held, None]).double().mean(0).reshape(L, H).numpy()
        induction = head_type_scores(loaded.model)["induction"]
    finally:
        torch.set_num_threads(threads)
    assert top_overlap(acc, induction, 5) == 5
    assert roc_auc_score((induction > 0.4).ravel(), acc.ravel()) > 0.95
    assert rank_agreement(acc, induction) > 0.2  # the old 'seen before' labels gave 0.06


def test_copy_carriers_counts_late_heads_that_are_not_induction_heads():
    induction = np.zeros((6, 4))
    induction[2, 1] = 0.8  # the first induction head is in layer 2
    score = np.zeros((6, 4))
    score[2, 1], score[4, 0], score[5, 3], score[1, 2] = 1.0, 0.9, 0.8, 0.7  # one induction head, two late carriers
    assert copy_carriers(score, list(range(6)), induction, k=4) == (2, 4, 2)
    assert copy_carriers(score[3:], [3, 4, 5], induction, k=2) == (2, 2, 2)  # evidence over some layers only
    assert copy_carriers(score, list(range(6)), np.zeros((6, 4)), k=4) == (0, 4, None)
    above = np.where(score > 0.75, score, np.nan)  # NaN (below the null) is not ranked
    assert copy_carriers(above, list(range(6)), induction, k=16) == (2, 3, 2)


def test_report_section_plots_the_copy_task_against_induction_scores(tmp_path):
    """The cross-check section of ``headprobe attribute`` on planted maps: rho in the table, the scatter written and
    linked, and the count of late non-induction heads among the copy task's top heads."""
    from headprobe.probes.attribution.evidence import Evidence
    from headprobe.probes.attribution.kinds.head_types import head_type_section
    from headprobe.probes.attribution.stage_map import build_stage_map

    rng = np.random.default_rng(0)
    L, H = 8, 6
    scores = {t: rng.uniform(0, 0.05, (L, H)) for t in ("previous_token", "duplicate_token", "induction")}
    scores["induction"][3, [1, 2]] = [0.9, 0.7]
    acc = 0.5 + rng.uniform(0, 0.02, (L, H))
    acc[3, [1, 2]] = [0.95, 0.9]
    acc[6:, :3] = 0.8  # six late heads carry the copied token without an induction pattern
    acc[0, :], acc[1, :2] = 0.6, 0.6  # eight early heads at the null (0.6): not counted
    evidence = [Evidence("repeat_tokens", "ICI", "linear", acc, 0.6, list(range(L)))]
    md = head_type_section(scores, evidence, build_stage_map(evidence), tmp_path)
    assert "![copy task against induction scores](induction_check.png)" in md
    assert (tmp_path / "induction_check.png").read_bytes().startswith(b"\x89PNG")
    assert "repeat_tokens/linear: 6 of its top 8 heads above the null sit after layer 3" in md
    rho, shared = rank_agreement(acc, scores["induction"]), top_overlap(acc, scores["induction"], 8)
    assert "| repeat_tokens/linear | ICI | " in md and f" | {rho:.2f} | {shared}/8 | 1.00 |" in md  # AUROC: both
    # induction heads outrank every other head


@pytest.mark.parametrize("bos,eos,vocab,low,high", [(1, 2, None, 3, 300), (290, 291, None, 1, 290),
                                                   (290, 291, 100, 1, 100)])
def test_random_tokens_avoid_special_tokens_at_either_end_of_the_vocabulary(monkeypatch, bos, eos, vocab, low, high):
    """Special tokens at the bottom (GPT-2 style ids 1, 2) or at the top (Llama 3: from 128000 of 128256) are
    never drawn as random tokens, so BOS cannot reappear inside the sequence."""
    import headprobe.probes.checks.head_scores as hs

    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos, eos, None
    drawn = []
    real = hs.repeated_random_tokens
    monkeypatch.setattr(hs, "repeated_random_tokens", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    head_type_scores(model, n=20, batch=4, vocab_size=vocab)  # vocab: draw from the first ids only
    body = drawn[0][:, 1:]  # after BOS
    assert drawn[0][:, 0].eq(bos).all() and body.min() >= low and body.max() < high
