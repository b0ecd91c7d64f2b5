"""Steering along probe directions (probes.steering): the hook against a hand-computed direct effect for every
family, interventions built from trained probes and round-tripped through checkpoints and a hub, and a tiny model
with a planted causal direction whose answer flips where the weights predict."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from headprobe import InputError, probes
from headprobe.extract.extractor import ExtractConfig, extract
from headprobe.extract.hooks import HeadCapture, head_layout, out_projections, output_weights
from headprobe.extract.models import LoadedModel, weights_fingerprint
from headprobe.extract.store import Store
from headprobe.extract.tasks import Example, Task
from headprobe.extract.tasks.metrics import right_padded
from headprobe.probes.checkpoint import load_local, save_checkpoint
from headprobe.probes.checks.steer import SteerResult, SteerRow, steer_sweep
from headprobe.probes.linear import LinearProbes
from headprobe.probes.steering import HeadSteering, Intervention, build_intervention, shift_table, steer
from headprobe.train.data import StoreDataModule
from helpers import FAMILIES, ByteTokenizer, tiny_model

torch.set_num_threads(1)


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _batch(n: int = 3, seed: int = 0) -> dict:
    """Right-padded random token ids of different lengths."""
    rng = np.random.default_rng(seed)
    return right_padded([rng.integers(3, 290, size=int(rng.integers(4, 12))).tolist() for _ in range(n)])


def _patched(model, delta: torch.Tensor, at: torch.Tensor | None) -> list:
    """Forward hooks adding ``delta`` (L, d_model) to each output projection's output, at every position (``at`` None)
    or where ``at`` (B, S) is 1."""
    def hook_for(layer: int):
        def hook(module, args, out):
            add = delta[layer].to(out.dtype)
            return out + (add if at is None else at[..., None].to(out.dtype) * add)
        return hook
    return [p.register_forward_hook(hook_for(i)) for i, p in enumerate(out_projections(model))]


@pytest.mark.parametrize("position", ["all", "last"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_steered_forward_is_the_clean_forward_plus_the_direct_effect(family, position):
    model = tiny_model(family)
    layout = head_layout(model)
    heads = [(0, 1), (0, 2), (layout.n_layers - 1, layout.n_heads - 1)]  # two heads of one layer, and another
    vectors = torch.randn(len(heads), layout.d_head, generator=torch.Generator().manual_seed(1))
    shift = shift_table(layout.n_layers, layout.n_heads, heads, vectors)
    W_O, _ = output_weights(model, list(range(layout.n_layers)))  # (L, H, D, d_model)
    delta = torch.einsum("lhd,lhdm->lm", shift, W_O)  # the direct effect, by hand
    batch = _batch()
    last = batch["attention_mask"].sum(1) - 1  # right padding: each row's last token
    at = torch.nn.functional.one_hot(last, batch["input_ids"].shape[1]) if position == "last" else None
    with torch.no_grad():
        clean = _output(model(**batch))
        with HeadSteering(model, shift, position):
            steered = _output(model(**batch))
        handles = _patched(model, delta, at)
        by_hand = _output(model(**batch))
        for h in handles:
            h.remove()
        after = _output(model(**batch))
    torch.testing.assert_close(steered, by_hand, rtol=1e-5, atol=1e-5)
    assert (steered - clean).abs().max() > 1e-2  # the shift does something
    torch.testing.assert_close(after, clean, rtol=0, atol=0)  # and leaves nothing behind
    if position == "last":  # the first row's tokens before its last are untouched where attention is causal
        rows = slice(None) if family == "bert" else slice(0, int(last[0]))
        same = (steered[0, rows] - clean[0, rows]).abs().max()
        assert (same > 1e-3) if family == "bert" else same < 1e-5


def test_the_last_position_follows_the_attention_mask():
    model = tiny_model("llama")
    steering = HeadSteering(model, torch.zeros(3, 6, 8), "last")
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    for mask, expected in ((right, [2, 4]), (left, [4, 4]), (None, [4, 4]), (torch.ones(2, 9), [4, 4])):
        steering._mask = mask  # None, or covering cached tokens too (generation): the last position
        assert steering.last_positions(2, 5, torch.device("cpu")).tolist() == expected
    steering.remove()


def test_generation_is_steered_at_the_new_tokens():
    model = tiny_model("llama")
    layout = head_layout(model)
    shift = shift_table(layout.n_layers, layout.n_heads, [(2, h) for h in range(6)], 50 * torch.ones(6, 8))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        clean = model.generate(ids, **kwargs)
        with HeadSteering(model, shift, "last"):
            steered = model.generate(ids, **kwargs)
            first = model(ids).logits[0, -1].argmax()
        with HeadSteering(model, shift, "all"):
            everywhere = model.generate(ids, **kwargs)
    assert steered[0, 5] == first and not torch.equal(steered, clean) and not torch.equal(everywhere, clean)
    assert torch.equal(model.generate(ids, **kwargs), clean)


def test_bad_shifts_and_heads_are_refused_in_one_line():
    model = tiny_model("gpt2")
    for call, says in ((lambda: HeadSteering(model, torch.zeros(2, 4, 8)), "shape"),
                       (lambda: HeadSteering(model, torch.zeros(3, 4, 8), "middle"), "position"),
                       (lambda: shift_table(3, 4, [(0, 1), (0, 1)], torch.ones(2, 8)), "twice"),
                       (lambda: shift_table(3, 4, [(3, 0)], torch.ones(1, 8)), "outside"),
                       (lambda: shift_table(3, 4, [(0, 0)], torch.ones(2, 8)), "one vector per head")):
        with pytest.raises(InputError, match=says) as err:
            call()
        assert "\n" not in str(err.value)


# --- a tiny model with a planted causal direction ----------------------------------------------------------------
D_MODEL, N_HEADS, PLANTED = 64, 4, (1, 2)  # the planted head: layer 1, head 2
A, B, X, Y = (3 + ord(c) for c in "ABXY")  # ByteTokenizer ids


def planted_model(seed: int = 0, k: float = 2.0, c: float = 4.0, beta: float = 4.0
                  ) -> tuple[torch.nn.Module, torch.Tensor]:
    """A 2-layer Llama whose answer "A" or "B" at the last token is the sign of one head's z along ``v``.

    The planted head (layer 1) is the only writer of a residual direction r (r is projected out of the
    embeddings and every other writer, the last MLP is zeroed), and it writes ``c * (v . z)`` along r; the LM
    head's rows for A and B differ only by ``2 beta r``, so (final RMSNorm having unit weights) the sign of
    logit(A) - logit(B) is the sign of v . z. Its value projection reads a cue direction e (+e in token X, -e in Y)
    into v, so z along v says whether the prompt ends in X or Y. Returns the model and v (D,)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=D_MODEL, num_hidden_layers=2,
                                     num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, intermediate_size=64,
                                     max_position_embeddings=128, attn_implementation="eager",
                                     tie_word_embeddings=False)).eval()
    D = D_MODEL // N_HEADS
    g = torch.Generator().manual_seed(seed + 1)
    (r, e), v = torch.linalg.qr(torch.randn(D_MODEL, 2, generator=g))[0].T, torch.randn(D, generator=g)
    v /= v.norm()
    keep = torch.eye(D_MODEL) - torch.outer(r, r)
    block = slice(PLANTED[1] * D, (PLANTED[1] + 1) * D)
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb.copy_(emb @ (keep - torch.outer(e, e)))
        emb[X] += e
        emb[Y] -= e
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.copy_(keep @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(keep @ layer.mlp.down_proj.weight)
        top = m.model.layers[PLANTED[0]]
        top.mlp.down_proj.weight.zero_()
        top.self_attn.o_proj.weight[:, block] += c * torch.outer(r, v)
        top.self_attn.v_proj.weight[block] += k * torch.outer(v, e)
        W_U = m.lm_head.weight
        W_U[B] = W_U[A] - beta * r
        W_U[A] += beta * r
    return m, v


def _cue_examples(seed: int, n: int = 200) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = int(rng.integers(0, 2))
        text = "".join(rng.choice(list("abcdefghij"), size=int(rng.integers(4, 10)))) + ("X" if label else "Y")
        out.append(Example(text=text, label=label, group=f"g{i}",
                           choice={"prompt": text, "candidates": ["A", "B"], "answer": 0 if label else 1}))
    return out


CUE_TASK = Task("cue", "LR", "a prompt ending in X asks for A, one ending in Y for B", ["ends_in_y", "ends_in_x"],
                _cue_examples)


def fit_probes(path) -> LinearProbes:
    module = LinearProbes(controls=["shuffled"])
    L.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0).fit(module, datamodule=StoreDataModule(str(path)))
    return module


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted model, its store of the cue task, and a LinearProbes checkpoint trained on that store."""
    folder = tmp_path_factory.mktemp("planted")
    model, v = planted_model()
    loaded = LoadedModel(model, ByteTokenizer(1), "planted", weights_fingerprint(model))
    store = extract(loaded, CUE_TASK, folder / "cue.h5", ExtractConfig(store_dtype="fp32"), progress=False)
    module = fit_probes(store)
    ckpt = save_checkpoint(folder / "probe", module.checkpoint_tensors(), module.checkpoint_config(),
                           module.checkpoint_metrics())
    return {"loaded": loaded, "v": v, "store": store, "probe": ckpt, "folder": folder}


def test_an_intervention_holds_the_top_heads_their_mass_mean_and_its_spread(planted):
    probe = probes.load(planted["probe"])
    with Store(planted["store"]) as store:
        intervention = build_intervention(probe, store, k=3, alpha=2.5)
        z = torch.from_numpy(store.activations(store.rows("train"))).double()  # (N, L, H, D)
    acc = np.array(probe.checkpoint_metrics_loaded["val"]["acc"][0])
    heads = intervention.head_list()
    assert heads[0] == PLANTED and len(heads) == 3
    assert all(acc[h] >= acc[h2] for h, h2 in zip(heads, heads[1:]))
    assert np.sum(acc >= acc[heads[-1]]) >= 3  # no head left out beats a chosen one
    theta = probe.mass_mean["direction"].float()
    for (layer, head), d, s in zip(heads, intervention.direction, intervention.sigma):
        torch.testing.assert_close(d, theta[layer, head])
        assert float(s) == pytest.approx(float((z[:, layer, head] @ d.double()).std(unbiased=False)), rel=1e-5)
    shift = intervention.shift()
    assert shift.shape == (2, N_HEADS, D_MODEL // N_HEADS) and int((shift.abs().sum(-1) > 0).sum()) == 3
    torch.testing.assert_close(shift[PLANTED], 2.5 * intervention.sigma[0] * intervention.direction[0])
    w = probe.newton.W[0, :, :-1, 0].float().reshape(2, N_HEADS, -1)[PLANTED]
    with Store(planted["store"]) as store:
        by_weight = build_intervention(probe, store, k=1, direction="probe")
    torch.testing.assert_close(by_weight.direction[0], w / w.norm())


def test_an_intervention_round_trips_through_a_checkpoint_and_a_hub(planted, tmp_path):
    from headprobe.probes.hub import push_to_folder

    probe = probes.load(planted["probe"])
    with Store(planted["store"]) as store:
        intervention = build_intervention(probe, store, k=2, alpha=3.0, position="last")
    folder = intervention.save_pretrained(tmp_path / "ck", intervention.checkpoint_config(
        probe.checkpoint_config_loaded, command="make it"), metrics={"val/margin": 1.0})
    push_to_folder(folder, tmp_path / "hub", "v9/cue-steer")
    for again in (load_local(folder), probes.load("v9/cue-steer", hub=tmp_path / "hub"),
                  Intervention.from_pretrained(folder)):
        assert isinstance(again, Intervention) and again.hparams == intervention.hparams
        torch.testing.assert_close(again.shift(), intervention.shift())
        assert again.head_list() == intervention.head_list()
        assert again.checkpoint_config_loaded.task == "cue"


def _last_z_and_answers(loaded, examples, intervention=None, alpha=None) -> tuple[torch.Tensor, np.ndarray]:
    """The planted head's z at each prompt's last token (clean) and the model's answers (1 for A) there, with the
    intervention at ``alpha`` if given."""
    model = loaded.model
    batch = right_padded([loaded.tokenizer(ex.text)["input_ids"] for ex in examples])
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad(), HeadCapture(model, [PLANTED[0]], stop_early=False) as cap:
        cap.select(torch.arange(len(examples)), last)
        model(**batch)
        z = cap.z[:, 0, PLANTED[1]].clone()
    with torch.no_grad():
        if intervention is None:
            logits = model(**batch).logits
        else:
            with steer(model, intervention, alpha=alpha):
                logits = model(**batch).logits
    at = logits[torch.arange(len(examples)), last]
    return z, (at[:, A] > at[:, B]).numpy().astype(int)


def _held_out(store_path) -> list[Example]:
    with Store(store_path) as store:
        held = np.unique(store.column("example_id")[store.column("split") != 0])
    examples = CUE_TASK.examples(0)
    return [examples[i] for i in held]


def test_steering_along_the_planted_direction_flips_the_answer_at_the_predicted_alpha(planted):
    loaded, v = planted["loaded"], planted["v"]
    with Store(planted["store"]) as store:
        intervention = build_intervention(planted["probe"], store, k=1)
    examples = [ex for ex in _held_out(planted["store"]) if ex.label == 0]
    z, answers = _last_z_and_answers(loaded, examples)
    assert answers.sum() == 0  # every "Y" prompt is answered B
    theta, sigma = intervention.direction[0], intervention.sigma[0]
    predicted = (-(z @ v) / (sigma * (theta @ v))).numpy()  # per example: where v . (z + alpha sigma theta) = 0
    assert (predicted > 0).all() and float(theta @ v) > 0.9
    alphas, mid = np.sort(predicted), len(predicted) // 2
    for alpha in (0.97 * alphas[0], (alphas[0] + alphas[1]) / 2, (alphas[mid] + alphas[mid + 1]) / 2,
                  1.03 * alphas[-1]):  # between two examples' predicted alphas, so float rounding cannot decide
        _, steered = _last_z_and_answers(loaded, examples, intervention, alpha)
        np.testing.assert_array_equal(steered, (predicted < alpha).astype(int))


def test_random_directions_of_equal_norm_do_not_flip_the_answer(planted):
    loaded = planted["loaded"]
    with Store(planted["store"]) as store:
        intervention = build_intervention(planted["probe"], store, k=1)
    examples = [ex for ex in _held_out(planted["store"]) if ex.label == 0]
    z, _ = _last_z_and_answers(loaded, examples)
    v, theta, sigma = planted["v"], intervention.direction[0], intervention.sigma[0]
    alpha = 1.03 * float((-(z @ v) / (sigma * (theta @ v))).max())  # flips every example along the probe's direction
    assert _last_z_and_answers(loaded, examples, intervention, alpha)[1].all()
    g = torch.Generator().manual_seed(0)
    flipped = []
    for _ in range(20):
        u = torch.randn(len(theta), generator=g)
        shift = shift_table(2, N_HEADS, [PLANTED], (alpha * sigma * u / u.norm())[None])
        flipped.append(_last_z_and_answers(loaded, examples, shift)[1].mean())
    assert np.mean(flipped) < 0.25 and max(flipped) < 1


# --- the sweep and its controls ----------------------------------------------------------------------------------
def test_the_sweep_flips_the_planted_answer_and_beats_both_controls(planted, tmp_path):
    from headprobe.probes.checks.steer_report import FILES, write_steer

    with Store(planted["store"]) as store:
        intervention = build_intervention(planted["probe"], store, k=1)
        examples = [ex for ex in _held_out(planted["store"]) if ex.label == 0]
        z, _ = _last_z_and_answers(planted["loaded"], examples)
        v, theta, sigma = planted["v"], intervention.direction[0], intervention.sigma[0]
        alpha = round(1.05 * float((-(z @ v) / (sigma * (theta @ v))).max()), 2)
        lines = []
        result = steer_sweep(planted["loaded"], planted["probe"], store, ks=(1,), alphas=(0.0, alpha), n_examples=200,
                             draws=8, corpus_tokens=60, task=CUE_TASK, log=lines.append)
    assert len(result.rows) == 2 * (1 + 2 * 8) and len(lines) == 2 and result.top_heads == {1: [list(PLANTED)]}
    assert result.clean["share_label1"] == pytest.approx(np.mean([ex.label for ex in _held_out(planted["store"])]))
    for row in result.rows:
        if row.alpha == 0:
            assert row.values == result.clean and row.kl == 0 and row.ce == result.ce_clean
        else:
            assert row.kl > 0 and np.isfinite(row.ce)
    share = result.summary(1, alpha, "share_label1")
    assert share["clean"] + share["probe"] == 1.0  # every held-out prompt is answered A
    assert share["beats_both"] and result.summary(1, alpha, "margin")["beats_both"]
    assert share["random_direction"]["mean"] < 0.5 * share["probe"]
    paths = write_steer({"cue": result}, tmp_path / "out")
    assert sorted(paths) == sorted(FILES) and all(p.stat().st_size > 0 for p in paths.values())
    import json

    again = SteerResult.from_dict(json.loads(paths["steer.json"].read_text())["cue"])
    assert again == result
    assert "margin beats both controls at 1 of 1 settings" in paths["steer.md"].read_text()


def _result(probe: float, controls: list[float]) -> SteerResult:
    rows = [SteerRow(4, 1.0, "probe", 0, {"margin": probe}, 2.0, 0.1)]
    rows += [SteerRow(4, 1.0, cond, i, {"margin": v}, 2.0, 0.1) for cond in ("random_direction", "random_heads")
             for i, v in enumerate(controls)]
    return SteerResult("t", "KR", ["no", "yes"], "mass_mean", "all", {"margin": "m"}, {"margin": 1.0}, 2.0,
                       {4: [[0, 0]]}, rows, draws=len(controls))


def test_steering_beats_a_control_only_above_one_draws_prediction_interval():
    from headprobe.probes.checks.ablation import t_interval

    controls = [1.0, 1.5, 2.0, 1.2]
    upper = t_interval(np.array(controls) - 1.0, one_draw=True)[1] + 1.0
    for probe, beats in ((upper + 0.01, True), (upper - 0.01, False), (2.1, False)):
        s = _result(probe, controls).summary(4, 1.0, "margin")
        assert s["random_direction"]["beats"] is s["random_heads"]["beats"] is s["beats_both"] is beats
        assert s["probe"] == pytest.approx(probe - 1.0)
    with pytest.raises(InputError, match="no K=8"):
        _result(3.0, controls).summary(8, 1.0, "margin")


# --- the shipped intervention ----------------------------------------------------------------------------------
def test_the_shipped_intervention_is_the_shipped_probes_top_heads_and_mass_means():
    from headprobe.probes.steering import head_ranking

    intervention, probe = probes.load("v1/sentiment-steer"), probes.load("v1/sentiment-linear")
    cfg, metrics = intervention.checkpoint_config_loaded, intervention.checkpoint_metrics_loaded
    assert isinstance(intervention, Intervention) and cfg.task == "sentiment" and cfg.command.startswith("headprobe")
    assert intervention.hparams == {"n_layers": 30, "n_heads": 9, "d_head": 64, "k": 8, "alpha": 2.0,
                                    "direction": "mass_mean", "position": "all"}
    top = head_ranking(probe.checkpoint_metrics_loaded, list(range(30)), list(range(9)))[:8]
    assert intervention.head_list() == top
    theta = probe.mass_mean["direction"].float()
    torch.testing.assert_close(intervention.direction, torch.stack([theta[h] for h in top]))
    assert (intervention.sigma > 0).all() and metrics["alpha"] == 2.0
    assert metrics["effect/margin"] > max(metrics["random_direction_pi_high/margin"],
                                          metrics["random_heads_pi_high/margin"])


@pytest.mark.slow
def test_the_shipped_intervention_steers_the_default_model_towards_positive():
    from headprobe.extract.models import load_model
    from headprobe.extract.tasks import TASKS
    from headprobe.extract.tasks.metrics import choice_metric

    loaded = load_model("smollm2-135m")
    negative = [ex for ex in TASKS["sentiment"].examples(0) if ex.label == 0][:8]
    clean = choice_metric(loaded, negative)  # margin of " negative" over " positive"
    with probes.steer(loaded.model, probes.load("v1/sentiment-steer")):
        steered = choice_metric(loaded, negative)
    assert clean["metric"] == 1.0 and steered["margin"] < clean["margin"] - 2
