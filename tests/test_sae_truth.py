"""Ground truth for SAEs: the world generator's measured properties against its settings, the recovery metrics and
seed consistency on hand-computed cases."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import multivariate_normal

from headprobe import InputError
from headprobe.probes.sae_truth import consistency_vs_truth, mcc, seed_consistency, truth_scores
from headprobe.probes.synthetic import WorldConfig, independent_config, make_world, world_summary

SMALL = dict(n_features=300, d=48, true_l0=5.0, n_roots=10, branching=3, depth=3, corr_rank=4, corr_strength=0.6,
             mean_max_cos=0.35, p_max=0.3, p_min=1e-3)


@pytest.fixture(scope="module")
def drawn():
    world = make_world(WorldConfig(**SMALL))
    return world, *world.sample(40_000, seed=1)


def firing(crow, feature, n_features):
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1), crow.diff())
    on = torch.zeros(len(crow) - 1, n_features, dtype=torch.bool)
    on[rows, feature] = True
    return on


def test_world_firing_rates_and_l0_match_settings(drawn):
    world, x, crow, feature, mag = drawn
    N = len(x)
    assert world.expected_l0() == pytest.approx(SMALL["true_l0"], abs=1e-4)
    assert float(crow.diff().double().mean()) == pytest.approx(SMALL["true_l0"], abs=0.05)
    rate = torch.bincount(feature, minlength=300).double() / N
    p = world.p.double()
    assert bool(((rate - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 2e-4).all())
    assert float(p.max()) <= SMALL["p_max"] * 3 and float(mag.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(mag.std()) == pytest.approx(0.15, abs=0.01)
    rows = torch.repeat_interleave(torch.arange(N), crow.diff())
    expect = torch.zeros_like(x).index_add_(0, rows, mag[:, None] * world.directions[feature]) + world.bias
    assert torch.allclose(x, expect, atol=1e-4)


def test_world_hierarchy_and_exclusion(drawn):
    world, x, crow, feature, _ = drawn
    on = firing(crow, feature, 300)
    child = (world.parent_of >= 0).nonzero().squeeze(1)
    assert len(child) == 10 * (3 + 9)
    assert not bool((on[:, child] & ~on[:, world.parent_of[child]]).any())  # a child fires only with its parent
    assert int(on[:, world.children].sum(2).max()) == 1  # siblings are mutually exclusive
    assert int(on[:, world.children].sum(2).sum()) > 1000


def test_world_correlations_follow_the_copula(drawn):
    world, x, crow, feature, _ = drawn
    on = firing(crow, feature, 300).double()
    p = world.p[world.top].double()
    C = world.U @ world.U.T
    C.fill_diagonal_(0)
    C[:, p < 0.05] = 0
    C[p < 0.05] = 0
    for flat in C.flatten().abs().topk(6).indices[::2]:
        i, j = divmod(int(flat), len(C))
        thr = world.thresholds[[i, j]].double().numpy()
        joint = multivariate_normal(cov=[[1, float(C[i, j])], [float(C[i, j]), 1]]).cdf(thr)
        seen = float((on[:, world.top[i]] * on[:, world.top[j]]).mean())
        assert abs(float(C[i, j])) > 0.2 and seen == pytest.approx(joint, abs=0.004)
        assert abs(seen - float(p[i] * p[j])) > 0.3 * float(p[i] * p[j])  # correlated, not independent


def test_world_superposition_level_and_independent_world():
    summary = world_summary(make_world(WorldConfig(**SMALL)))
    assert SMALL["mean_max_cos"] - 0.05 <= summary["measured_mean_max_cos"] <= SMALL["mean_max_cos"]
    world = make_world(independent_config(**{**SMALL, "n_roots": 0, "corr_rank": 0, "corr_strength": 0.0}))
    assert int((world.parent_of >= 0).sum()) == 0 and world.expected_l0() == pytest.approx(5.0, abs=1e-4)
    with pytest.raises(InputError, match="true_l0"):
        make_world(WorldConfig(**{**SMALL, "true_l0": 1000.0}))
    with pytest.raises(InputError, match="p_min"):
        WorldConfig(p_min=0.5, p_max=0.1).check()


def test_mcc_uniqueness_found_and_f1_by_hand():
    D = torch.eye(2)
    W = torch.tensor([[0.8, 0.6], [1.0, 0.0]])  # both latents are closest to feature 0
    assert mcc(W, D) == pytest.approx((0.6 + 1.0) / 2)  # one-to-one: latent 1 -> f0, latent 0 -> f1
    crow = torch.tensor([0, 1, 3, 4, 4])  # rows: {f0}, {f0, f1}, {f1}, {}
    feature = torch.tensor([0, 0, 1, 1])
    f = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5]])
    s = truth_scores(W, D, f, crow, feature)
    # latent 0 (best f0): fires rows 0, 2; f0 fires rows 0, 1 -> TP 1, P 1/2, R 1/2, F1 1/2
    # latent 1 (best f0): fires rows 0, 1, 3 -> TP 2, P 2/3, R 1, F1 4/5
    assert (s.precision, s.recall, s.f1) == pytest.approx(((1 / 2 + 2 / 3) / 2, 0.75, 0.65))
    assert s.uniqueness == 0.5 and s.found == 1 and s.mcc == pytest.approx(0.8)
    with pytest.raises(InputError, match="same rows"):
        truth_scores(W, D, f[:3], crow, feature)


def test_seed_consistency_on_constructed_decoders():
    W_a = torch.eye(3)
    W_b = torch.tensor([[0.0, -2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])  # permuted, a sign, a scale, one tilted
    c = seed_consistency(W_a, W_b)
    assert c.a.tolist() == pytest.approx([1.0, 1.0, 0.8]) and c.b.tolist() == pytest.approx([1.0, 1.0, 0.8])
    assert c.mcc == pytest.approx(2.8 / 3) and c.consistent().tolist() == [True, True, False]
    vs = consistency_vs_truth(torch.tensor([0.95, 0.99, 0.5, 0.92]), torch.tensor([0.97, 0.95, 0.3, 0.6]))
    assert vs["precision"] == pytest.approx(2 / 3) and vs["recall"] == 1.0 and vs["spearman"] == pytest.approx(0.8)  # ranks 3 4 1 2 vs 4 3 1 2
