"""Attribution to heads and the stage map: exact identities, and planted heads recovered from every artifact."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.kinds.linear import linear_evidence
from headprobe.probes.attribution.kinds.sae import (decoder_head_shares, direct_feature_attribution, feature_task_auroc,
                                                    feature_ties, sae_evidence)
from headprobe.probes.attribution.kinds.sparse import sparse_evidence
from headprobe.probes.sparse import group_norms
from headprobe.probes.attribution.stage_map import STAGE_AXIS as STAGES
from headprobe.probes.attribution.stage_map import build_stage_map, write_stage_map
from helpers import PLANTED, H, L, group_lasso, lda_accuracy, make_tasks, planted_map, topk_activations, topk_sae

LAYERS = list(range(L))


def test_decoder_shares_sum_to_one_over_heads():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6 * 5, generator=g)
    W[3] = 0  # a dead feature: uniform shares
    W[7] = 0
    W[7, 10:15] = torch.randn(5, generator=g)  # written by head 2 only
    shares = decoder_head_shares(W, n_heads=6)
    assert shares.shape == (40, 6)
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(shares[3], 1 / 6)
    np.testing.assert_allclose(shares[7], np.eye(6)[2])
    expected = W.view(40, 6, 5).norm(dim=2)
    np.testing.assert_allclose(shares[0], (expected[0] / expected[0].sum()).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of"):
        decoder_head_shares(W[:, :29], n_heads=6)


@pytest.mark.parametrize("with_b_dec", [True, False])
def test_direct_feature_attribution_sums_to_preactivation(with_b_dec):
    g = torch.Generator().manual_seed(1)
    N, Hh, D, F = 32, 6, 8, 50
    z = torch.randn(N, Hh, D, generator=g) * 3
    W_enc, b_enc = torch.randn(F, Hh * D, generator=g) / 4, torch.randn(F, generator=g)  # SparseAutoencoder layout
    b_dec = torch.randn(Hh * D, generator=g) if with_b_dec else None
    per_head, bias = direct_feature_attribution(z, W_enc, b_enc, b_dec)
    assert per_head.shape == (N, Hh, F) and bias.shape == (F,)
    x = z.reshape(N, -1) - (b_dec if with_b_dec else 0)
    np.testing.assert_allclose((per_head.sum(1) + bias).numpy(), (x @ W_enc.T + b_enc).numpy(), atol=1e-5)
    # each head's term is that head's block alone
    np.testing.assert_allclose(per_head[:, 4].numpy(), (z[:, 4] @ W_enc[:, 4 * D:5 * D].T).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"must be \(50, 48\)"):  # the transposed layout is refused, not misread
        direct_feature_attribution(z, W_enc.T.contiguous(), b_enc, b_dec)


def test_direct_feature_attribution_of_a_trained_sae_module():
    """On SparseAutoencoder's own tensors: the per-head terms plus the bias give its encoder pre-activation."""
    from headprobe.probes.sae import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=4 * 8, expansion=2, k=4)
    with torch.no_grad():
        sae.b_dec.normal_()  # a trained SAE's b_dec is not zero
    z = torch.randn(16, 4, 8)
    per_head, bias = direct_feature_attribution(z, sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach())
    pre = (z.reshape(16, -1) - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    np.testing.assert_allclose((per_head.sum(1) + bias).numpy(), pre.detach().numpy(), atol=1e-5)


def test_feature_auroc_matches_sklearn_and_its_null_spread_matches_shuffles():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    acts = np.maximum(rng.normal(size=(300, 6)) - 1.0, 0)  # sparse: many tied zeros
    acts[:, 0] += 0.8 * y  # informative
    acts[:, 5] = 0  # never fires
    auroc = feature_task_auroc(acts, y)
    np.testing.assert_allclose(auroc, [roc_auc_score(y, a) for a in acts.T], atol=1e-12)
    assert auroc[5] == 0.5
    # unlabelled rows are left out
    y2 = y.copy()
    y2[:50] = -1
    np.testing.assert_allclose(feature_task_auroc(acts, y2), [roc_auc_score(y[50:], a[50:]) for a in acts.T])
    # the tie-corrected null spread matches what label shuffles give
    _, threshold = feature_ties(acts, y, alpha=0.05, n_tests=1)
    shuffled = np.stack([feature_task_auroc(acts, rng.permutation(y)) for _ in range(400)])
    z = 1.959964
    np.testing.assert_allclose(threshold[1:5], 2 * z * shuffled[:, 1:5].std(0), rtol=0.12)
    assert threshold[5] == np.inf
    # more classes: the mean one-vs-rest AUROC, each read in its better direction
    y3 = rng.integers(0, 3, 300)
    per_class = [[roc_auc_score(y3 == c, a) for c in range(3)] for a in acts.T]
    np.testing.assert_allclose(feature_task_auroc(acts, y3), [np.mean([max(v, 1 - v) for v in r]) for r in per_class])
    with pytest.raises(ValueError, match="two label classes"):
        feature_task_auroc(acts, np.ones(300))


def test_group_norms_are_zero_exactly_for_dropped_heads():
    w = np.random.default_rng(0).normal(size=(3, 4, 5, 2))
    w[1, 2] = 0
    n = group_norms(w)
    assert n.shape == (3, 4) and n[1, 2] == 0
    np.testing.assert_allclose(n[0, 0], np.linalg.norm(w[0, 0]))


# --- planted heads ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tasks():
    return make_tasks(seed=0)


def linear_evidences(tasks):
    rng = np.random.default_rng(1)
    return [linear_evidence(t.name, t.stage, lda_accuracy(t.z, t.labels, t.train, t.val),
                            lda_accuracy(t.z, rng.permutation(t.labels), t.train, t.val), LAYERS, n_val=len(t.val))
            for t in tasks]


def sparse_evidences(tasks):
    rng = np.random.default_rng(2)
    out = []
    for t in tasks:
        z = (t.z - t.z[t.train].mean(0)) / t.z[t.train].std(0)
        w = group_lasso(z[t.train], t.labels[t.train])
        control = group_lasso(z[t.train], rng.permutation(t.labels[t.train]))
        out.append(sparse_evidence(t.name, t.stage, group_norms(w), LAYERS, group_norms(control)))
    return out


def sae_evidences(tasks):
    """One TopK SAE per layer, trained on every task's z at that layer (a stand-in for a text corpus)."""
    saes = {layer: topk_sae(np.concatenate([t.z[:, layer].reshape(len(t.z), -1) for t in tasks]), seed=layer)
            for layer in LAYERS}
    out = []
    for t in tasks:
        per_sae = []
        for layer, sae in saes.items():
            per_head, bias = direct_feature_attribution(torch.as_tensor(t.z[:, layer], dtype=torch.float32),
                                                        sae["W_enc"].T, sae["b_enc"], sae["b_dec"])
            per_sae.append((topk_activations(per_head.sum(1) + bias, 4).numpy(), sae["W_dec"].numpy(), [layer]))
        out.append(sae_evidence(t.name, t.stage, per_sae, t.labels, LAYERS, n_heads=H))
    return out


@pytest.mark.parametrize("source", ["linear", "sparse", "sae"])
def test_stage_map_puts_exactly_the_planted_heads_at_their_stages(tasks, source):
    evidence = {"linear": linear_evidences, "sparse": sparse_evidences, "sae": sae_evidences}[source](tasks)
    stage_map = build_stage_map(evidence)
    assert stage_map.scores.shape == (L, H, 4)
    assert stage_map.assigned() == planted_map()
    for stage, heads in PLANTED.items():
        top = stage_map.top_heads(stage, k=len(heads) + 3)
        assert {(layer, head) for layer, head, _ in top} == set(heads)


def test_no_stage_without_signal():
    noise = make_tasks(amplitude=0.0, seed=3)
    assert build_stage_map(linear_evidences(noise)).assigned() == {}


def test_stage_map_files(tasks, tmp_path):
    import matplotlib.image

    stage_map = build_stage_map(linear_evidences(tasks) + sparse_evidences(tasks[:1]))
    paths = write_stage_map(stage_map, tmp_path / "attr", k=4)
    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == L * H
    got = {(int(r["layer"]), int(r["head"])): r["stage"] for r in rows if r["stage"]}
    assert got == planted_map()
    data = json.loads(paths["json"].read_text())
    assert data["stages"] == list(STAGES) and np.array(data["scores"]).shape == (L, H, 4)
    assert {e["source"] for e in data["evidence"]} == {"linear", "sparse"}
    md = paths["markdown"].read_text()
    assert "![stage map](stage_map.png)" in md
    lr_part = md.split("### LR")[1].split("### EP")[0]
    assert "L2.H0" in lr_part and "L3.H3" in lr_part and "L0.H1" not in lr_part
    assert "kr_a/linear" in md.split("### KR")[1].split("### ICI")[0]


def test_a_task_decodable_everywhere_does_not_take_over_the_shared_map():
    """An EP task above its null on every head (as sentiment on SmolLM2) and a KR task found in six heads, two of
    them strongly: scaled by share, the six are KR and the rest EP; scaled by max, EP also takes the four weaker
    KR heads, whose excess is half the KR task's best while every head matches the EP task's best."""
    kr = np.zeros((4, 6))
    kr[1, :2], kr[2, :4] = 0.3, 0.15
    evidence = [Evidence("kr_task", "KR", "linear", 0.5 + kr, 0.5, list(range(4))),
                Evidence("ep_task", "EP", "linear", np.full((4, 6), 1.0), 0.95, list(range(4)))]
    strong, weak = {(1, 0), (1, 1)}, {(2, h) for h in range(4)}
    shared = build_stage_map(evidence, scale="share").assigned()
    assert {head for head, stage in shared.items() if stage == "KR"} == strong | weak
    assert len(shared) == 24 and sum(stage == "EP" for stage in shared.values()) == 18
    by_max = build_stage_map(evidence, scale="max").assigned()
    assert all(by_max[head] == "EP" for head in weak)
    assert build_stage_map(evidence).scores.max() == 1.0
    with pytest.raises(ValueError, match="unknown scale"):
        build_stage_map(evidence, scale="sum")


def test_one_layer_evidence_weighs_by_the_heads_it_covers():
    """Scaled by share, an SAE on one of 4 layers that ties a task to one head carries a quarter of the weight of a
    probe over all layers: its head (KR) does not outweigh the two heads an all-layer LR probe found (0.5 each),
    while alone it would get the whole KR weight."""
    lr = np.zeros((4, 6))
    lr[0, :2] = 0.3
    sae_score = np.zeros((1, 6))
    sae_score[0, 3] = 1.0
    evidence = [Evidence("lr_task", "LR", "linear", 0.5 + lr, 0.5, [0, 1, 2, 3]),
                Evidence("kr_task", "KR", "sae", sae_score, 0.5, [2])]
    stage_map = build_stage_map(evidence)
    kr, lr_ = stage_map.scores[2, 3, STAGES.index("KR")], stage_map.scores[0, 0, STAGES.index("LR")]
    assert kr == pytest.approx(0.5 * lr_)  # 1 x 1/4 against 0.5 x 1
    assert stage_map.assigned() == {(0, 0): "LR", (0, 1): "LR", (2, 3): "KR"}
    assert (stage_map.scale, stage_map.reduce) == ("share", "mean")


def test_evidence_on_some_heads_weighs_by_the_heads_it_measured():
    """NaN heads are not measured: a probe over 1 of 6 heads of all 4 layers weighs as evidence on 4 of 24 heads,
    as an evidence on one layer does (above), not as if it covered every head."""
    lr = np.zeros((4, 6))
    lr[0, :2] = 0.3
    some = np.full((4, 6), np.nan)
    some[:, 3] = 0.5
    some[2, 3] = 1.5
    evidence = [Evidence("lr_task", "LR", "linear", 0.5 + lr, 0.5, [0, 1, 2, 3]),
                Evidence("kr_task", "KR", "sparse", some, 0.5, [0, 1, 2, 3])]
    stage_map = build_stage_map(evidence)
    kr, lr_ = stage_map.scores[2, 3, STAGES.index("KR")], stage_map.scores[0, 0, STAGES.index("LR")]
    assert kr == pytest.approx(lr_ / 3)  # 1 x 4/24 against 0.5 x 1 (counting all 24 heads: 1, KR would dominate)
    assert stage_map.assigned() == {(0, 0): "LR", (0, 1): "LR", (2, 3): "KR"}


def test_sae_reading_some_heads_gives_no_evidence_on_the_others():
    """An SAE on heads 0-1 of 4 (its decoder padded with zero blocks for heads 2-3): heads 2-3 get NaN (not
    measured), and the even-share null divides the tied features over the 2 heads it reads."""
    rng = np.random.default_rng(0)
    N, D, F = 400, 3, 6
    labels = rng.integers(0, 2, N)
    acts = np.maximum(rng.normal(size=(N, F)), 0)
    acts[:, 0] += 2.0 * labels  # feature 0 is tied to the task
    W_dec = np.zeros((F, 4, D))
    W_dec[:, :2] = rng.normal(size=(F, 2, D))
    W_dec[0, 1] = 0  # feature 0 is written by head 0 only
    ev = sae_evidence("t", "KR", [(acts, W_dec.reshape(F, -1), [5])], labels, [5], n_heads=4)
    assert np.isnan(ev.score[0, 2:]).all() and np.isnan(ev.null[0, 2:]).all()
    assert ev.score[0, 0] > 0 and ev.score[0, 1] == pytest.approx(0, abs=0.05)
    assert ev.null[0, 0] == pytest.approx(ev.score[0, :2].sum() / 2)  # the weight spread over the 2 heads it reads
    assert ev.excess()[0, 0] > 0 and (ev.excess()[0, 1:] == 0).all()


def test_stage_map_refuses_bad_evidence():
    with pytest.raises(ValueError, match="no evidence"):
        build_stage_map([])
    ev = linear_evidence("t", "XX", np.ones((2, 3)), np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="unknown stage"):
        build_stage_map([ev])
    with pytest.raises(ValueError, match="2 layers"):
        linear_evidence("t", "KR", np.ones((3, 3)), np.zeros((3, 3)), [0, 1])


def test_the_attribution_functions_are_importable_from_probes():
    import importlib

    from headprobe import probes

    for name in dir(probes):
        module = probes._EXPORTS[name]
        assert getattr(probes, name) is getattr(importlib.import_module(module), name), name
    assert {"evidence_from_checkpoints", "build_stage_map", "head_type_scores", "causal_checks"} <= set(dir(probes))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        probes.nope
