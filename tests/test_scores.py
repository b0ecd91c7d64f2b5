"""Training-free head scores: each checked on a tiny model whose weights are set by hand so that one known head
does the job (that head scores at the top, far above its null; the others stay at or below it), plus the prompt
builders, the batched decoding against plain forward passes, the OV shortcut against the full V x V circuit, the
attribution kinds and the ``headprobe scores`` command."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helpers import ByteTokenizer, run_cli, save_model_folder, tiny_loaded, tiny_model

from headprobe import InputError
from headprobe.extract.tasks.needle import needle_prompts, needles
from headprobe.extract.tasks.yes_no import binary_questions
from headprobe.probes.checks.head_scores import attention_patterns
from headprobe.probes.checks.negative import negative_scores
from headprobe.probes.checks.ov_scores import (copying_scores, ordinal_tokens, ov_nulls, ov_weights,
                                               successor_scores)
from headprobe.probes.checks.retrieval import _batch_answers, _decode, retrieval_scores
from headprobe.probes.checks.scores import DEFAULT_POOLED as POOLED
from headprobe.probes.checks.scores import ScoreConfig, compute_scores

D, HEADS, D_HEAD = 64, 2, 32


def hand_llama(layers: int = 2, vocab: int = 300, bias: bool = False) -> LlamaForCausalLM:
    """A Llama whose MLPs and output projections are zero (the residual stream is the token embedding until a head
    is given an output), norm gains 1, unit-norm embeddings, and the unembedding equal to the embedding."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, intermediate_size=32, max_position_embeddings=512,
                      attention_bias=bias, attn_implementation="eager")
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for block in m.model.layers:
            block.mlp.down_proj.weight.zero_()
            block.self_attn.o_proj.weight.zero_()
        e = torch.randn(vocab, D)
        m.model.embed_tokens.weight.copy_(e / e.norm(dim=1, keepdim=True))
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    return m


def block(h: int) -> slice:
    return slice(h * D_HEAD, (h + 1) * D_HEAD)


class WordTokenizer:
    """Words (with their leading space) and punctuation as tokens; " Yes" and " No" get ids 5 and 6."""

    def __init__(self, vocab: int = 300):
        self.vocab, self.ids = vocab, {" Yes": 5, " No": 6, "Yes": 7, "No": 8}
        self.chat_template = None

    def _id(self, piece: str) -> int:
        if piece not in self.ids:
            self.ids[piece] = 10 + len(self.ids) % (self.vocab - 10)
        return self.ids[piece]

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [self._id(p) for p in re.findall(r"\s*\w+|\s*[^\w\s]|\s+", text)]}


# --- retrieval ---------------------------------------------------------------------------------------------------

def retrieval_model(delta: int, gain: float = 30.0) -> LlamaForCausalLM:
    """Layer 1, head 0 attends from every position i to i - ``delta`` (constant query and key, the key turned so
    that RoPE peaks there) and writes the attended token's embedding (x ``gain``) to the output: it copies the token
    ``delta`` back. Token embeddings live on the first d_head axes, which the head's value block reads as they are.
    Every other head keeps its random queries and keys and writes nothing."""
    m = hand_llama(bias=True)
    attn = m.model.layers[1].self_attn
    with torch.no_grad():
        e = torch.randn(m.config.vocab_size, D_HEAD)
        m.model.embed_tokens.weight.zero_()
        m.model.embed_tokens.weight[:, :D_HEAD] = e / e.norm(dim=1, keepdim=True)
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
        c = torch.full((D_HEAD,), 13.0)
        cos, sin = m.model.rotary_emb(c.view(1, 1, D_HEAD), torch.tensor([[delta]]))
        k, _ = apply_rotary_pos_emb(c.view(1, 1, 1, D_HEAD), c.view(1, 1, 1, D_HEAD), cos, sin)
        attn.q_proj.weight[block(0)] = 0
        attn.q_proj.bias[block(0)] = c
        attn.k_proj.weight[block(0)] = 0
        attn.k_proj.bias[block(0)] = k.flatten()
        attn.v_proj.weight[block(0)] = torch.eye(D)[:D_HEAD]
        attn.o_proj.weight[:, block(0)] = gain / 8 * torch.eye(D)[:, :D_HEAD]  # the norm scales unit vectors x 8
    return m


def test_a_head_that_copies_the_needle_scores_one_and_the_others_stay_under_the_null():
    tok = ByteTokenizer(bos_token_id=1)
    prompts = needle_prompts(tok, lengths=(230, 260), depths=(1.0,), n_needles=1, chat=False)
    delta = {len(p.ids) - 1 - p.span[0] for p in prompts}
    assert len(delta) == 1  # the needle right before the question: one offset for every length
    model = retrieval_model(delta.pop())
    r = retrieval_scores(model, prompts, batch_size=2)
    assert r.accuracy["teacher_token_accuracy"] == 1.0 and r.accuracy["generate_success"] == 1.0
    for score, null in ((r.teacher, r.teacher_null), (r.generate, r.generate_null)):
        assert score[1, 0] == pytest.approx(1.0)
        assert null[1, 0] < 0.5  # shuffled answers: the head still looks at the needle but not at the token
        others = np.delete(score.ravel(), 2)
        assert (others <= np.maximum(0.1, np.delete(null.ravel(), 2))).all()


def test_batched_decoding_reads_the_same_attention_as_plain_forward_passes():
    loaded = tiny_loaded("llama")
    prompts = needle_prompts(loaded.tokenizer, lengths=(300,), depths=(0.0, 0.5), n_needles=2, chat=False)
    ids = torch.tensor([p.ids for p in prompts])
    answers, mask, _ = _batch_answers(prompts)
    t_top, t_pred, g_top, generated = _decode(loaded.model, ids, answers)
    P = ids.shape[1]
    forced = torch.cat([ids, answers[:, :-1]], 1)
    ref = attention_patterns(loaded.model, forced)[:, :, :, P - 1:].argmax(-1)
    assert ((ref == t_top) | ~mask[:, None, None, :]).all()
    assert (loaded.model(forced).logits[:, P - 1:].argmax(-1) == t_pred)[mask].all()
    free = torch.cat([ids, generated[:, :-1]], 1)
    assert (attention_patterns(loaded.model, free)[:, :, :, P - 1:].argmax(-1) == g_top).all()


def test_needle_prompts_have_the_asked_length_and_the_answer_at_its_span():
    tok = ByteTokenizer(bos_token_id=1)
    prompts = needle_prompts(tok, lengths=(300, 400), depths=(0.0, 0.5, 1.0), n_needles=2, chat=False)
    assert len(prompts) == 12 and {len(p.ids) for p in prompts} == {300, 400}
    for p in prompts:
        assert p.ids[p.span[0]:p.span[1]] == p.answer == tok(" " + needles()[p.needle].answer, False)["input_ids"]
    cuts = [p.meta["cut"] for p in prompts if p.length == 400 and p.needle == 0]
    assert cuts == sorted(cuts) and cuts[0] == 0
    with pytest.raises(InputError, match="too short"):
        needle_prompts(tok, lengths=(50,), depths=(0.5,), n_needles=1)


def test_chat_prompts_split_the_template_around_the_haystack():
    from helpers import byte_tokenizer

    tok = byte_tokenizer(bos=False)
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    p = needle_prompts(tok, lengths=(300,), depths=(0.5,), n_needles=1)[0]
    text = tok.decode(p.ids)
    assert len(p.ids) == 300 and text.startswith("<u>") and text.endswith("</u><a>" + needles()[0].statement)


# --- negative ----------------------------------------------------------------------------------------------------

def negative_model() -> LlamaForCausalLM:
    """Layer 1: head 0 attends to the token " No" wherever it is, head 1 to " Yes" (content only: query and key in
    RoPE's slowest pair, which barely turns over a few hundred positions); layer 0's queries are zero (uniform
    attention). The candidates' embeddings are the last two axes, which no other token uses."""
    m = hand_llama(bias=True)
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        e[:, -2:] = 0
        e /= e.norm(dim=1, keepdim=True)
        e[5], e[6] = torch.eye(D)[-2], torch.eye(D)[-1]  # " Yes", " No"
        m.lm_head.weight.copy_(e)
        m.model.layers[0].self_attn.q_proj.weight.zero_()
        m.model.layers[0].self_attn.q_proj.bias.zero_()
        attn = m.model.layers[1].self_attn
        slow = D_HEAD // 2 - 1  # the slowest RoPE frequency's first axis
        for h, axis in ((0, -1), (1, -2)):
            attn.q_proj.weight[block(h)] = 0
            attn.q_proj.bias[block(h)] = 0
            attn.q_proj.bias[h * D_HEAD + slow] = 12.0
            attn.k_proj.weight[block(h)] = 0
            attn.k_proj.weight[h * D_HEAD + slow, axis] = 12.0
    return m


def test_a_head_that_attends_to_no_has_the_top_negative_score_and_the_others_do_not():
    tok = WordTokenizer()
    questions = binary_questions(tok, n=32, chat=False)
    placebo = {"Red/Blue": binary_questions(tok, n=32, chat=False, words=(" Red", " Blue"))}
    r = negative_scores(negative_model(), questions, placebo, batch_size=16)
    assert r.score[1, 0] == r.score.max() and r.score[1, 0] > 1.5 * r.null[1, 0] > 0
    assert r.score[1, 1] < 0 and r.score[1, 1] == pytest.approx(-r.score[1, 0], rel=0.05)  # the " Yes" head
    assert np.abs(r.score[0]).max() < 1e-9  # uniform attention: as much on either candidate
    assert (r.score <= r.null)[[0, 0, 1], [0, 1, 1]].all()
    assert r.answers["placebo_max"]["Red/Blue"] < 1e-3  # neither candidate head finds its word among Red and Blue


def test_binary_questions_mark_the_candidates_and_balance_truth_and_order():
    tok = WordTokenizer()
    qs = binary_questions(tok, n=16, chat=False)
    assert len(qs) == 16 and sum(q.truth for q in qs) == 8
    assert sum(q.yes[0] < q.no[0] for q in qs) == 8
    for q in qs:
        assert q.ids[q.yes[0]:q.yes[1]] == [5] and q.ids[q.no[0]:q.no[1]] == [6]
        assert q.query_start == max(q.yes[1], q.no[1]) + 1 and q.answer_ids == (5, 6)
    with pytest.raises(InputError, match="--questions"):
        binary_questions(tok, n=0)


# --- OV circuits -------------------------------------------------------------------------------------------------

def test_an_identity_ov_circuit_scores_one_and_random_heads_stay_under_their_null():
    m = hand_llama()
    torch.manual_seed(1)
    with torch.no_grad():
        for blk in m.model.layers:
            blk.self_attn.o_proj.weight.normal_()
        U = torch.linalg.qr(torch.randn(D, D))[0][:, :D_HEAD]  # (D, d_head) orthonormal columns
        m.model.layers[1].self_attn.v_proj.weight[block(0)] = U.T
        m.model.layers[1].self_attn.o_proj.weight[:, block(0)] = U
    w = ov_weights(m)
    scores = copying_scores(w)
    null = ov_nulls(w, None)["copying"]
    assert scores[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert (np.delete(scores.ravel(), 2) < null["threshold"]).all() and abs(null["mean"]) < 0.1


def test_a_successor_ov_circuit_scores_one_and_random_heads_stay_under_their_null():
    tok = ByteTokenizer(bos_token_id=1)
    seqs = ordinal_tokens(tok, {"letter": (list("ABCDEFGHIJ"), False), "digit": ([str(k) for k in range(1, 10)], False)})
    m = hand_llama()
    torch.manual_seed(2)
    with torch.no_grad():
        for blk in m.model.layers:
            blk.self_attn.o_proj.weight.normal_()
        tokens = [t for ids, _ in seqs.values() for t in ids]
        basis = torch.linalg.qr(torch.randn(D, D))[0][:, :len(tokens)].T  # one orthonormal embedding per token
        m.model.embed_tokens.weight[tokens] = basis
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
        attn = m.model.layers[1].self_attn
        attn.v_proj.weight[block(0)] = 0
        attn.o_proj.weight[:, block(0)] = 0
        for i, t in enumerate(tokens):
            ids = next(ids for ids, _ in seqs.values() if t in ids)
            if ids.index(t) + 1 < len(ids):
                attn.v_proj.weight[i] = basis[i]
                attn.o_proj.weight[:, i] = basis[tokens.index(ids[ids.index(t) + 1])]
    w = ov_weights(m)
    scores = successor_scores(w, seqs)
    null = ov_nulls(w, seqs)["successor"]
    assert scores[1, 0] == 1.0
    assert (np.delete(scores.ravel(), 2) < null["threshold"]).all()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_copying_score_equals_that_of_the_full_vocabulary_circuit(family):
    model = tiny_model(family)
    w = ov_weights(model)
    fast = copying_scores(w)
    C = (w.E.double() @ (w.g1[:, None, :, None].double() * w.W_V.double()) @ w.W_O.double()
         @ (w.gf[:, None].double() * w.U.T.double()))  # (L, H, V, V)
    lam = torch.linalg.eigvals(C)
    full = (lam.real.sum(-1) / lam.abs().sum(-1)).numpy()
    assert np.allclose(fast, full, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_value_blocks_are_the_models_own_value_projection(family):
    model = tiny_model(family)
    w = ov_weights(model)
    x = torch.randn(5, w.E.shape[1])
    attn = model.base_model.get_submodule({"gpt2": "h.0.attn", "gpt_neox": "layers.0.attention",
                                           "llama": "layers.0.self_attn"}[family])
    with torch.no_grad():
        if family == "gpt2":
            v = attn.c_attn(x)[:, 2 * x.shape[1]:].view(5, -1, w.W_V.shape[-1])
        elif family == "gpt_neox":
            v = attn.query_key_value(x).view(5, w.W_V.shape[1], 3, -1)[:, :, 2]
        else:
            v = attn.v_proj(x).view(5, -1, w.W_V.shape[-1]).repeat_interleave(w.W_V.shape[1] // 2, 1)
        mine = torch.einsum("nd,hde->nhe", x, w.W_V[0]) + w.b_V[0]
    assert torch.allclose(mine, v, atol=1e-4)


# --- the evidence, the kinds and the command ---------------------------------------------------------------------

def test_scores_are_evidence_with_their_stage_and_pooled_as_documented():
    loaded = tiny_loaded("llama")
    cfg = ScoreConfig(["negative", "copying", "successor", "induction"], questions=8)
    result = compute_scores(loaded, cfg)
    got = {ev.extra["score"]: ev for ev in result.evidence}
    assert [ev.extra["score"] for ev in result.evidence] == cfg.scores
    assert {n: ev.stage for n, ev in got.items()} == {"negative": "KR", "copying": "ICI", "successor": "LR",
                                                       "induction": "LR"}
    assert all((ev.source == "scores") == (n in POOLED) for n, ev in got.items())
    assert all(ev.score.shape == (3, 6) and np.isfinite(ev.null).all() for ev in result.evidence)
    with pytest.raises(InputError, match="unknown retrieva"):
        ScoreConfig(["retrieva"])


def test_a_score_the_model_cannot_have_is_skipped_with_its_reason_and_the_others_still_run():
    """A byte-level tokenizer needs ~260 tokens for the shortest needle prompt: the 256-token length is dropped (and
    recorded); with no length left the retrieval score is skipped, said why, and the negative score still runs."""
    from headprobe.extract.tasks.needle import shortest_length

    loaded = tiny_loaded("llama")
    shortest = shortest_length(loaded.tokenizer)
    assert 256 < shortest < 512
    kept = compute_scores(loaded, ScoreConfig(["retrieval"], lengths=[256, 512], depths=[0.5]))
    assert kept.of("retrieval").extra["details"]["lengths"] == [512] and not kept.skipped
    none = compute_scores(loaded, ScoreConfig(["retrieval", "negative"], lengths=[256], questions=8))
    assert [ev.extra["score"] for ev in none.evidence] == ["negative"]
    assert list(none.skipped) == ["retrieval"] and f"({shortest} tokens)" in none.skipped["retrieval"]


def test_the_kinds_pool_the_pooled_scores_into_the_stage_map_and_write_their_section(tmp_path):
    from headprobe.probes.attribution.contract import AttributionInputs, kinds
    from headprobe.probes.attribution.result import Attribution, AttributionConfig
    from headprobe.probes.attribution.stage_map import build_stage_map

    found = kinds()
    assert found["scores"].pooled and not found["score_checks"].pooled
    assert not found["scores"].enabled(AttributionConfig()) and not found["score_checks"].enabled(AttributionConfig())
    config = AttributionConfig(scores=["successor", "copying"])
    inputs = AttributionInputs(config, load_model=lambda: tiny_loaded("llama"))
    pooled = found["scores"].collect(inputs)
    checks = found["score_checks"].collect(inputs)
    assert [ev.task for ev in pooled] == ["successor_score"] and [ev.task for ev in checks] == ["copying_score"]
    result = Attribution(config, pooled + checks, build_stage_map(pooled))
    text = found["scores"].section(result, tmp_path, "img/")
    assert "### successor" in text and "### copying" in text and found["score_checks"].section(result) == ""
    names = {p.name for p in found["scores"].write(result, tmp_path)}
    assert {"scores.csv", "scores.json", "score_successor.png", "score_copying.png"} <= names
    from headprobe.train.head_tables import score_table  # the run report's per-head table of the scores

    rows = score_table(result)
    assert [(r["layer"], r["head"]) for r in rows] == [(layer, head) for layer in range(3) for head in range(6)]
    for ev, name in ((pooled[0], "successor (LR)"), (checks[0], "copying (ICI)")):
        np.testing.assert_array_equal([r[name] for r in rows], ev.score.ravel())
        np.testing.assert_array_equal([r[f"{name} null"] for r in rows], ev.null.ravel())
    assert {r["stage"] for r in rows} <= {"", "LR"}


def test_scores_command_writes_tables_and_heatmaps_and_refuses_bad_input(tmp_path):
    model = save_model_folder(tmp_path / "model")
    out = tmp_path / "out"
    argv = ["scores", "--model", model, "--scores", "negative,copying,successor", "--questions", "8", "--out", str(out)]
    code, log = run_cli(argv, tmp_path / "log.txt")
    assert code == 0, log
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "layer,head,negative,negative_null,copying,copying_null,successor,successor_null"
    assert len(rows) == 1 + 3 * 6
    data = json.loads((out / "scores.json").read_text())
    assert [e["task"] for e in data["evidence"]] == ["negative_score", "copying_score", "successor_score"]
    assert all((out / f"score_{n}.png").stat().st_size > 0 for n in ("negative", "copying", "successor"))
    before = (out / "scores.csv").read_bytes()
    for bad, says in ((["--scores", "retrieval,bogus", "--overwrite"], "unknown bogus"),
                      (["--questions", "8"], "holds scores")):
        code, log = run_cli([*argv[:-4], *bad, "--out", str(out)], tmp_path / "log.txt")
        assert code == 2 and re.search(says, log.strip().splitlines()[-1]), log
    assert (out / "scores.csv").read_bytes() == before


def test_scores_command_options_refuse_bad_lists():
    import argparse

    from headprobe.probes.checks.scores_cli import _depths, _ints

    assert _ints("256,512") == [256, 512] and _depths("0,0.5,1") == [0.0, 0.5, 1.0]
    for parse, text in ((_ints, "12,x"), (_ints, "0"), (_ints, ""), (_depths, "0.5,2"), (_depths, "a")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_scores_refuse_models_and_prompts_they_cannot_score():
    gpt2 = tiny_loaded("gpt2")
    prompts = needle_prompts(gpt2.tokenizer, lengths=(300,), depths=(0.5,), n_needles=1, chat=False)
    with pytest.raises(InputError, match="positions"):
        retrieval_scores(gpt2.model, prompts)  # GPT-2's 128 learned positions
    with pytest.raises(InputError, match="causal language model"):
        ov_weights(tiny_model("bert"))


def test_a_retrieval_score_without_answered_prompts_says_so(tmp_path):
    from headprobe.probes.checks.scores import score_evidence
    from headprobe.probes.checks.scores_report import load_scores, scores_section, write_scores

    ev = score_evidence("retrieval", np.full((2, 3), np.nan), 0.1, {})
    assert "No score: the model answered none" in scores_section([ev], folder=tmp_path)
    write_scores([ev], tmp_path)
    assert np.isnan(load_scores(tmp_path)[0].score).all()


def test_agreement_with_the_probes_ranks_heads_over_the_probes_layers():
    from headprobe.probes.attribution.evidence import Evidence
    from headprobe.probes.checks.scores import score_evidence
    from headprobe.probes.checks.scores_report import agreement_lines

    rng = np.random.default_rng(0)
    score = score_evidence("retrieval", rng.random((6, 8)), 0.1)
    same = Evidence("repeat_tokens", "ICI", "linear", score.score[2:], 0.5, [2, 3, 4, 5])
    flat = Evidence("ioi", "ICI", "sparse", np.zeros((6, 8)), 0.0, list(range(6)))
    rows = agreement_lines([score], [same, flat])
    assert "| repeat_tokens/linear | ICI | 1.00 (8) |" in rows and "| ioi/sparse | ICI | - |" in rows
