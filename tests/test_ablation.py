"""Head ablation hooks change the model only through the ablated heads; the causal check compares with random heads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headprobe.extract.hooks import HeadCapture, head_layout, out_projections, spec_for
from headprobe.probes.checks.ablation import HeadAblation, causal_check, causal_checks, head_means
from helpers import tiny_model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mean_ablation_with_own_mean_on_a_constant_input_changes_nothing(family):
    model = tiny_model(family)
    layout = head_layout(model)
    ids = torch.full((3, 1), 17)  # every row and position the same: each head's z is its own mean
    means = head_means(model, [{"input_ids": ids}])
    every = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    varied = torch.tensor([[17, 40, 99, 5]])
    clean, clean_varied = logits(model, ids), logits(model, varied)
    with HeadAblation(model, every, "mean", means):
        torch.testing.assert_close(logits(model, ids), clean, atol=1e-5, rtol=0)
        assert not torch.allclose(logits(model, varied), clean_varied, atol=1e-3)  # the hooks are live
    torch.testing.assert_close(logits(model, varied), clean_varied)  # and gone after the context


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_ablating_a_head_equals_removing_its_output_weights(family):
    """The ablation acts only through the chosen head: the same as deleting that head's block of W_O."""
    model = tiny_model(family)
    layout = head_layout(model)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    heads = [(1, 2), (2, 0)]
    with HeadAblation(model, heads, "zero"):
        ablated = logits(model, ids)
    proj, D = out_projections(model), layout.d_head
    with torch.no_grad():
        for layer, head in heads:
            w = proj[layer].weight
            block = slice(head * D, (head + 1) * D)
            (w[block] if spec_for(model).conv1d else w[:, block]).zero_()
    torch.testing.assert_close(ablated, logits(model, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, logits(tiny_model(family), ids), atol=1e-3)


def test_zero_ablating_every_head_equals_removing_attention_output():
    model = tiny_model("llama")  # no output-projection bias
    layout = head_layout(model)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    every = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    with HeadAblation(model, every, "zero"):
        ablated = logits(model, ids)
    handles = [p.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for p in out_projections(model)]
    try:
        removed = logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ablated, removed, atol=1e-6, rtol=0)
    assert not torch.allclose(removed, logits(model, ids), atol=1e-3)


def test_head_means_average_the_unpadded_tokens():
    model = tiny_model("gpt2")
    layout = head_layout(model)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    means = head_means(model, [{"input_ids": ids, "attention_mask": mask}])
    b, p = torch.nonzero(mask, as_tuple=True)
    with HeadCapture(model, list(range(layout.n_layers)), stop_early=False) as cap:
        cap.select(b, p)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(means, cap.z.mean(0), atol=1e-5, rtol=0)


def test_causal_check_top_heads_against_random_heads():
    model = tiny_model("llama")
    layout = head_layout(model)
    ids = torch.randint(3, 300, (8, 10), generator=torch.Generator().manual_seed(3))
    clean = logits(model, ids)[:, -1]

    def metric(m) -> np.ndarray:  # per example: minus the squared change of the last-token logits
        return -((logits(m, ids)[:, -1] - clean) ** 2).mean(-1).numpy()

    effect = {}
    for l in range(layout.n_layers):
        for h in range(layout.n_heads):
            with HeadAblation(model, [(l, h)], "zero"):
                effect[(l, h)] = -metric(model).mean()
    top = sorted(effect, key=effect.get, reverse=True)[:2]
    res = causal_check(model, metric, top, n_draws=6, mode="zero", seed=0)
    assert res.clean == pytest.approx(0.0, abs=1e-12)
    assert res.k == 2 and len(res.random) == 6 and len(res.random_heads) == 6
    assert all(len(set(d)) == 2 and not set(d) & set(top) for d in res.random_heads)
    assert res.top_ci[0] <= res.top <= res.top_ci[1] and res.random_ci[0] <= res.random_mean <= res.random_ci[1]
    lo, hi = res.random_pi  # one draw's prediction interval is wider than the mean's CI
    assert lo < res.random_ci[0] and hi > res.random_ci[1]
    assert res.top < min(res.random) and res.top < lo and res.hurts_more
    assert res.to_dict()["hurts_more"] is True
    both = causal_checks(model, metric, top, n_draws=6, mode="zero", seed=0)  # each pool draws alike alone or not
    assert both["all"].random_heads == res.random_heads
    assert both["layers"].random_heads == causal_check(model, metric, top, 6, "zero", seed=0, pool="layers").random_heads
    assert causal_check(model, metric, top, 6, "zero", seed=1).random_heads != res.random_heads


def test_causal_checks_refuse_bad_settings_before_running_the_metric():
    model, calls = tiny_model("gpt2"), []

    def metric(m) -> np.ndarray:
        calls.append(1)
        return np.zeros(2)

    layout = head_layout(model)
    every = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    for top, draws, pools, message in [([(0, 1), (0, 1)], 5, ("all",), "name a head twice"),
                                       ([(0, 1)], 1, ("all",), "draw at least 2"),
                                       (every[: len(every) // 2 + 1], 5, ("layers", "all"), "ablate fewer top heads"),
                                       ([(0, 1)], 5, ("model",), "use 'all' or 'layers'")]:
        with pytest.raises(ValueError, match=message):
            causal_checks(model, metric, top, draws, "zero", pools=pools)
    assert not calls


def test_ablation_refuses_bad_heads():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="outside"):
        HeadAblation(model, [(3, 0)], "zero")
    with pytest.raises(ValueError, match="head_means"):
        HeadAblation(model, [(0, 0)], "mean")
    with pytest.raises(ValueError, match="mode"):
        HeadAblation(model, [(0, 0)], "resample")


def test_ablations_of_a_task_through_its_model_metric(tmp_path):
    from headprobe.probes.attribution.evidence import Evidence, top_heads
    from headprobe.probes.attribution.kinds.ablation import ablation_section, run_ablations
    from helpers import tiny_loaded

    loaded = tiny_loaded("llama")
    score = np.full((3, 6), 0.5)
    score[2, 4], score[0, 1], score[1, 3] = 0.9, 0.8, 0.6  # above the null: 2.4, then 0.1; 1.3 below it
    evidence = [Evidence("capitals", "KR", "linear", score, 0.7, [0, 1, 2]),
                Evidence("ioi", "ICI", "linear", score, 0.7, [0, 1, 2])]
    assert top_heads(evidence, "capitals", 3) == [(2, 4), (0, 1), (1, 3)]
    results = run_ablations(loaded, evidence, k=2, mode="mean", draws=3, n_examples=8)
    assert not results["ioi"]["probe_after_scored"] and "readout" not in results["ioi"]  # probes read what is scored
    r = results["capitals"]
    assert r["metric"] == "margin" and r["k"] == 2 and r["top_heads"] == [(2, 4), (0, 1)] and len(r["random"]) == 3
    same = r["random_from"]["layers"]  # random heads from layers 0 and 2 only, the top heads' layers
    assert r["pool"] == "all" and same["pool"] == "layers" and same["top"] == r["top"] and len(same["random"]) == 3
    assert all(sorted(l for l, _ in draw) == [0, 2] for draw in same["random_heads"])  # one head in each
    assert r["top"] != r["clean"]  # the tiny model's answer margins move when its heads are replaced
    assert r["probe_after_scored"]  # capitals probes read the answer token, after the scored prediction
    ro = r["readout"]  # so the same heads are also scored on the last layer's readout of the label
    assert ro["metric"] == "readout_logprob" and ro["top_heads"] == r["top_heads"] and ro["clean"] != r["clean"]
    assert ro["random_heads"] == r["random_heads"]  # paired: the same random draws as the margin's
    assert ro["random_from"]["layers"]["random_heads"] == same["random_heads"] and ro["top"] != ro["clean"]
    md = ablation_section(results, tmp_path)
    assert f"| capitals | readout_logprob | 2 | mean | {ro['clean']:.3f} | {ro['top']:.3f} | all layers |" in md
    assert "| the answer, last layer† |" in md and "† readout_logprob:" in md
    assert "![ablation: top heads against random heads](ablation.png)" in md
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| capitals | margin | 2 | mean |" in md and "| the answer (after*) |" in md and "\\* True/false" in md
    assert "lands about 2.5% of the time (3 draws). Random heads come from all layers (the top heads left out) or " \
           "layer-matched" in md
    for c, pool in [(r, "all layers"), (same, "layer-matched")]:
        (lo, hi), (m_lo, m_hi) = c["random_pi"], c["random_ci"]
        shared = np.mean([len({(2, 4), (0, 1)} & set(map(tuple, d))) for d in c["random_heads"]])
        assert (f"| {pool} | {c['random_mean']:.3f} [{m_lo:.3f}, {m_hi:.3f}] | [{lo:.3f}, {hi:.3f}] | "
                f"{shared:.1f}/2 | {'yes' if c['hurts_more'] else 'no'} | the answer (after*) |") in md
    assert "| all layers | " in md and "| 0.0/2 | " in md  # all-layer draws leave the top heads out
    crowded = {"ioi": {**r, "random_from": {}, "pool": "layers", "top_heads": [(0, 0), (0, 1), (1, 0)],
                       "random_heads": [[(0, 0), (0, 1), (1, 2)], [(0, 0), (0, 3), (1, 0)]]}}
    assert "| layer-matched | " in ablation_section(crowded) and " | 2.0/3 | " in ablation_section(crowded)


def test_random_heads_from_all_layers_or_layer_matched():
    from headprobe.probes.checks.ablation import draw_random_heads

    top, rng = [(3, 0), (3, 1), (7, 2)], np.random.default_rng(0)
    everywhere = [draw_random_heads(top, 10, 4, "all", rng) for _ in range(300)]
    assert all(len(set(d)) == 3 and not set(d) & set(top) for d in everywhere)
    assert len({l for d in everywhere for l, _ in d}) == 10
    matched = [draw_random_heads(top, 10, 4, "layers", rng) for _ in range(2000)]
    assert all(len(set(d)) == 3 and sorted(l for l, _ in d) == [3, 3, 7] for d in matched)
    # the top heads are drawn as often as any other head of their layer: 2 of 4 in layer 3, 1 of 4 in layer 7
    share = {head: np.mean([head in d for d in matched]) for head in [(3, 0), (3, 2), (7, 2), (7, 0)]}
    assert all(abs(share[h] - 0.5) < 0.04 for h in [(3, 0), (3, 2)]), share
    assert all(abs(share[h] - 0.25) < 0.04 for h in [(7, 2), (7, 0)]), share
    full = [(5, h) for h in range(4)]  # a layer of top heads only: every draw is that layer
    assert draw_random_heads(full, 10, 4, "layers", rng) == full
    with pytest.raises(ValueError, match="only 3 heads besides the 5 top heads: ablate fewer"):
        draw_random_heads([(0, h) for h in range(4)] + [(1, 0)], 2, 4, "all", rng)
    with pytest.raises(ValueError, match="use 'all' or 'layers'"):
        draw_random_heads(top, 10, 4, "model", rng)


def test_ablation_report_without_results_or_from_an_older_ablation_json(tmp_path):
    from headprobe.probes.attribution.kinds.ablation import ablation_section
    from headprobe.probes.checks.ablation import plot_ablation

    assert ablation_section({}, tmp_path).endswith("No task with a model metric was ablated.\n")
    assert not (tmp_path / "ablation.png").exists()
    with pytest.raises(ValueError, match="no ablation results to plot"):
        plot_ablation({}, tmp_path / "a.png")
    old = {"ioi": {"metric": "margin", "k": 2, "mode": "mean", "clean": 1.0, "top": 0.2, "random": [0.9, 0.8],
                   "random_mean": 0.85, "random_ci": [0.7, 1.0], "hurts_more": True}}  # no pool, no random_pi
    md = ablation_section(old, tmp_path)
    assert "| ioi | margin | 2 | mean | 1.000 | 0.200 | all layers | 0.850 [0.700, 1.000] | - | - | yes | - |" in md
    assert "Random heads come from all layers (the top heads left out). The mean's" in md  # the one pool it ran
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "bert"])
def test_replaying_the_clean_prefix_gives_the_recomputed_ablated_forward(family):
    """An ablated forward that replays the clean run's blocks below its first ablated layer equals the forward
    that recomputes them, call for call; the replayed blocks do no work."""
    from headprobe.probes.checks.replay import PrefixReplay, decoder_blocks

    model = tiny_model(family)
    batches = [torch.randint(3, 300, (3, 9)), torch.randint(3, 300, (2, 5))]
    run = lambda: [model(input_ids=ids).last_hidden_state if family == "bert" else model(input_ids=ids).logits  # noqa: E731
                   for ids in batches]
    prefix = PrefixReplay(model)
    with torch.no_grad(), prefix.record():
        run()
    heads = [(1, 0), (1, 3)]
    with torch.no_grad(), HeadAblation(model, heads, "zero"):
        recomputed = run()
    calls = []
    handle = decoder_blocks(model)[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), prefix.replay(1), HeadAblation(model, heads, "zero"):
        replayed = run()
    handle.remove()
    for a, b in zip(recomputed, replayed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(calls) == 2  # block 0 "ran" (its hooks fire) but returned the recording
    with pytest.raises(RuntimeError, match="other forward calls"), torch.no_grad(), prefix.replay(1):
        model(input_ids=torch.randint(3, 300, (4, 9)))


def test_ablation_results_are_the_same_with_or_without_the_replayed_prefix():
    model = tiny_model("llama")
    ids = torch.randint(3, 300, (6, 12))
    metric = lambda m: m(input_ids=ids).logits[:, -1].log_softmax(-1)[:, 7].detach().numpy()  # noqa: E731
    means = head_means(model, [{"input_ids": ids}])
    fast = causal_checks(model, metric, [(1, 2), (2, 0)], n_draws=3, means=means, seed=5)
    slow = causal_checks(model, metric, [(1, 2), (2, 0)], n_draws=3, means=means, seed=5, replay=False)
    for pool in fast:
        assert fast[pool].random_heads == slow[pool].random_heads
        np.testing.assert_array_equal(fast[pool].random, slow[pool].random)
        assert (fast[pool].clean, fast[pool].top) == (slow[pool].clean, slow[pool].top)
