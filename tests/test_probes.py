"""Probes: the batched Newton solver against scikit-learn, head selection, controls, metrics, checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score

from headprobe.extract.store import write_array_store as write_store
from headprobe.probes import newton
from headprobe.probes.attribution import evidence_from_checkpoints
from headprobe.probes.checkpoint import load_local, save_checkpoint
from headprobe.probes.linear import LinearProbes, control_labels
from headprobe.probes.metrics import auroc, bootstrap_ci
from headprobe.probes.newton import NewtonState, fit_newton, newton_stats, penalised
from headprobe.probes.sparse import SparseProbe, ksparse_sweep
from headprobe.train.data import StoreDataModule
from helpers import planted


def fit(module: L.LightningModule, path: Path, epochs: int = 30, **data) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=StoreDataModule(str(path), **data))
    return trainer


# --- the solver against sklearn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["logistic", "softmax", "ridge"])
def test_newton_matches_sklearn_per_probe(loss):
    rng = np.random.default_rng(1)
    N, P, D = 300, 5, 6
    x = rng.normal(size=(N, P, D)) * np.logspace(-2, 1, P)[None, :, None]
    if loss == "ridge":
        y = x[:, 0] @ rng.normal(size=D) + rng.normal(size=N)
    else:
        y = rng.integers(0, 3 if loss == "softmax" else 2, N)
    W, info = fit_newton(torch.from_numpy(x), torch.from_numpy(y)[:, None].double(), loss, n_classes=3, tol=1e-10)
    assert info["steps"] < 30
    for p in range(P):
        if loss == "ridge":
            ref = Ridge(alpha=1.0).fit(x[:, p], y)
            coef, intercept = ref.coef_[:, None], np.atleast_1d(ref.intercept_)
        else:
            ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x[:, p], y)
            coef, intercept = ref.coef_.T, ref.intercept_
        w, b = W[0, p, :-1].numpy(), W[0, p, -1].numpy()
        if loss == "softmax":  # softmax intercepts are defined up to a shift
            b = b - b.mean() + intercept.mean()
        np.testing.assert_allclose(w, coef, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b, intercept, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 21])
@pytest.mark.parametrize("probes", [[4, 0, 5], [1, 3, 2, 4]])
@pytest.mark.parametrize("loss,C", [("logistic", 1), ("softmax", 3), ("ridge", 1)])
def test_newton_stats_match_autograd_whatever_the_threads(loss, C, probes, chunk_bytes):
    """Loss, gradient and Hessian of a subset of probes in any order (as the solver reorders them), chunked one
    probe at a time or all at once, against autograd; 1 and 2 threads give identical bits."""
    g = torch.Generator().manual_seed(0)
    N, P, D, K = 60, 6, 4, 2
    x = torch.randn(N, P, D, generator=g) * torch.logspace(-1, 1, P)[None, :, None]
    y = (torch.randn(N, K, generator=g, dtype=torch.float64) if loss == "ridge"
         else torch.randint(0, max(C, 2), (N, K), generator=g).double())
    W = torch.randn(K, P, D + 1, C, generator=g, dtype=torch.float64) * 0.5
    probes = torch.tensor(probes)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x_pnd = x.transpose(0, 1)  # (P, N, D)
            outs.append(newton_stats(x_pnd, y, W, loss, probes=probes, chunk_bytes=chunk_bytes))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    loss_sum, grad, hess = outs[0]
    F = torch.nn.functional
    objective = {"logistic": lambda eta, t: F.binary_cross_entropy_with_logits(eta[:, 0], t, reduction="sum"),
                 "softmax": lambda eta, t: F.cross_entropy(eta, t.long(), reduction="sum"),
                 "ridge": lambda eta, t: 0.5 * (eta[:, 0] - t).pow(2).sum()}[loss]
    for j, p in enumerate(probes.tolist()):
        xa = torch.cat([x[:, p].double(), torch.ones(N, 1, dtype=torch.float64)], 1)
        for k in range(K):
            f = lambda w: objective(xa @ w, y[:, k])
            w = W[k, p].clone().requires_grad_()
            value = f(w)
            (gw,) = torch.autograd.grad(value, w)
            hw = torch.autograd.functional.hessian(f, W[k, p]).reshape((D + 1) * C, (D + 1) * C)
            torch.testing.assert_close(loss_sum[k, j], value.detach(), rtol=1e-10, atol=1e-10)  # softplus: x > 20 -> x
            torch.testing.assert_close(grad[k, j], gw, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(hess[k, j], hw, rtol=1e-5, atol=1e-5 * float(hw.abs().max()))


def test_converged_probes_leave_the_solve_chord_steps_and_every_probe_meets_tol():
    rng = np.random.default_rng(2)
    N, P, D = 400, 12, 5
    x = torch.from_numpy(rng.normal(size=(N, P, D)) * np.logspace(-2, 0.5, P)[None, :, None]).float()
    strong = x[:, 3, 0].double() / x[:, 3, 0].std()  # head 3 predicts the label well and takes the most steps
    y = (torch.from_numpy(rng.random(N)) < torch.sigmoid(4 * strong)).double()
    y2 = torch.stack([y, torch.from_numpy(rng.integers(0, 2, N).astype(float))], 1)
    xp = x.transpose(0, 1).contiguous()  # (P, N, D)
    state = NewtonState(2, P, D, 1)
    active = []
    while True:
        active.append(len(state.active))
        stats = newton_stats(xp, y2, state.W, "logistic", probes=state.active, n_hessian=state.n_hessian)
        if state.update(*stats, l2=1.0, n=N, tol=1e-8):
            break
    assert active[0] == P and active[-1] < P and state.probe_steps == sum(active)  # some probes stopped early
    assert state.hessians < state.probe_steps  # and near-converged ones reused their last Hessian
    loss_sum, grad, _ = newton_stats(xp, y2, state.W, "logistic")  # every probe, at its final weights
    _, g = penalised(loss_sum, grad, state.W, 1.0)
    assert float(g.abs().amax() / N) < 1e-8


def test_the_solver_module_runs_its_usage_example_without_lightning():
    """probes.newton stands on its own: its docstring's example runs in a fresh process that never imports
    Lightning, and the probe on the features the labels were read from is the one that decodes them."""
    example = textwrap.dedent(newton.__doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0])
    code = example + "\nimport sys\nprint(int(acc.argmax()), float(acc.max()), 'lightning' in sys.modules)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    best, top, lightning = res.stdout.split()
    assert (best, lightning) == ("3", "False") and float(top) > 0.95


def test_non_finite_activations_are_refused_with_a_message():
    x = torch.randn(50, 2, 3)
    x[7, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf: check the activations"):
        fit_newton(x, torch.randint(0, 2, (50, 1)).double(), "logistic")


def test_whole_split_in_one_epoch_equals_streamed_newton_epochs(tmp_path):
    z, y, split = planted()
    path = write_store(tmp_path / "planted.h5", z, y, split)
    whole, streamed = LinearProbes(controls=["shuffled"]), LinearProbes(controls=["shuffled"])
    t_whole = fit(whole, path)
    t_streamed = fit(streamed, path, batch_size=64, in_memory=False)
    assert t_whole.current_epoch == 1 and t_streamed.current_epoch == streamed.newton.steps > 3
    torch.testing.assert_close(whole.newton.W, streamed.newton.W, rtol=0, atol=1e-5)  # the same optimum, to tol
    np.testing.assert_allclose(whole.tables["val"]["acc"], streamed.tables["val"]["acc"])


# --- head selection on planted data --------------------------------------------------------------------------------
def test_group_lasso_and_per_head_probes_rank_the_planted_heads_first(tmp_path):
    heads = [(0, 1), (1, 2), (2, 3)]
    z, y, split = planted(heads=heads)
    path = write_store(tmp_path / "planted.h5", z, y, split)
    chosen = {l * 4 + h for l, h in heads}

    probes = LinearProbes(controls=["control"])
    fit(probes, path)
    acc = probes.tables["val"]["acc"][0]  # (L, H)
    assert set(np.argsort(-acc.ravel(), kind="stable")[:3]) == chosen
    assert acc.ravel()[sorted(chosen)].min() > 0.85
    control = probes.tables["val"]["acc"][1]
    assert (acc - control).ravel()[sorted(chosen)].min() > 0.2  # selectivity of the planted heads
    val = split == 1
    predicted = probes.predict(torch.from_numpy(z[val]).float())  # (N, L, H) class ids of every head's probe
    np.testing.assert_allclose((predicted == torch.from_numpy(y[val])[:, None, None]).double().mean(0).numpy(), acc,
                               atol=1e-9)

    sparse = SparseProbe(penalty="group_lasso", alpha=0.05, inner_steps=100)
    fit(sparse, path, epochs=10)
    norms = sparse.group_norm().numpy().ravel()
    assert set(np.argsort(-norms, kind="stable")[:3]) == chosen
    assert (norms > 0).sum() < norms.size  # whole heads were dropped, exactly
    assert sparse.summary["val/acc"] > 0.9


def test_l1_and_elastic_net_give_exact_zeros(tmp_path):
    z, y, split = planted()
    path = write_store(tmp_path / "planted.h5", z, y, split)
    for penalty in ("l1", "elastic_net"):
        probe = SparseProbe(penalty=penalty, alpha=0.05, inner_steps=100)
        fit(probe, path, epochs=5)
        assert (probe.W == 0).float().mean() > 0.5
        assert probe.summary["val/acc"] > 0.9


def test_ksparse_finds_the_signal_dimension():
    z, y, split = planted()
    N, Ln, H, D = z.shape
    x = torch.from_numpy(z.reshape(N, Ln * H, D))
    out = ksparse_sweep(x, torch.from_numpy(y), torch.from_numpy(split == 0), torch.from_numpy(split == 1), [1, 4])
    assert out[1]["index"][1, 0] == 0  # planted head (0, 1) is probe 1, its signal in dimension 0
    assert out[1]["val_acc"][1] > 0.85
    assert out[4]["val_acc"].shape == (Ln * H,)


# --- controls and metrics ------------------------------------------------------------------------------------------
def test_control_labels():
    rng = np.random.default_rng(0)
    labels, split, types = rng.integers(0, 2, 200), rng.integers(0, 3, 200), rng.integers(0, 10, 200)
    ctl = control_labels(labels, split, types, "control", seed=3)
    for t in np.unique(types):
        assert len(np.unique(ctl[types == t])) == 1  # one label per word type
    shuf = control_labels(labels, split, types, "shuffled", seed=3)
    for s in range(3):
        assert np.bincount(shuf[split == s], minlength=2).tolist() == np.bincount(labels[split == s], minlength=2).tolist()
    assert (shuf != labels).any()


def test_a_control_with_one_label_is_skipped_reported_and_costs_no_newton_steps(tmp_path, caplog):
    """Every row read at one token (a facts-like store): the control task has one label and no optimum. It is
    skipped with the reason in the metrics, the fit is the one configured without it (same Newton steps, same
    weights), selectivity is reported for the shuffled control only, and the checkpoint's config says so."""
    z, y, split = planted()
    path = write_store(tmp_path / "one-token.h5", z, y, split, token_id=np.full(len(y), 13, np.int32))
    both, shuffled = LinearProbes(controls=["control", "shuffled"]), LinearProbes(controls=["shuffled"])
    with caplog.at_level("WARNING", logger="headprobe.probes.linear"):
        fit(both, path)
    fit(shuffled, path)
    assert both.newton.steps == shuffled.newton.steps < both.hparams.max_steps
    assert torch.equal(both.newton.W, shuffled.newton.W)
    why = "every training row has the same token_id (read at one token), so the control task has one label"
    metrics = both.checkpoint_metrics()
    assert metrics["controls_skipped"] == {"control": why}
    assert both.fitted_controls == ["shuffled"] and np.shape(metrics["val"]["acc"]) == (2, 3, 4)
    assert "val/selectivity_shuffled_max" in metrics and not [k for k in metrics if "_control_" in k]
    warned = [r.getMessage() for r in caplog.records if r.name == "headprobe.probes.linear"]
    assert warned == [f"{path}: control 'control' skipped: {why}; selectivity uses shuffled instead"]
    folder = save_checkpoint(tmp_path / "ck", both.checkpoint_tensors(), both.checkpoint_config(), metrics)
    config = load_local(folder).checkpoint_config_loaded
    assert config.hparams["controls"] == ["shuffled"] and config.hparams["controls_skipped"] == {"control": why}
    (evidence,) = evidence_from_checkpoints([folder])
    assert list(evidence.extra["selectivity"]) == ["shuffled"]


def test_a_reloaded_checkpoint_config_lists_the_controls_fitted(tmp_path):
    z, y, split = planted()
    module = LinearProbes(controls=["control", "shuffled"])
    fit(module, write_store(tmp_path / "planted.h5", z, y, split))
    assert module.checkpoint_metrics()["val"]["acc"] and "controls_skipped" not in module.checkpoint_metrics()
    folder = save_checkpoint(tmp_path / "ck", module.checkpoint_tensors(), module.checkpoint_config(),
                             module.checkpoint_metrics())
    loaded = load_local(folder)
    assert loaded.checkpoint_config_loaded.hparams["controls"] == ["control", "shuffled"]
    assert '"controls": ["control", "shuffled"]' in (folder / "README.md").read_text()
    zz = torch.from_numpy(z[:50]).float()
    torch.testing.assert_close(loaded(zz), module(zz), rtol=1e-4, atol=1e-4)  # the task weights, no controls


def test_auroc_and_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (100, 3))
    s = rng.normal(size=(100, 3)) + y * np.array([0.0, 1.0, 3.0])
    s[:10, 0] = s[10:20, 0]  # ties
    ours = auroc(torch.from_numpy(s), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(ours, [roc_auc_score(y[:, i], s[:, i]) for i in range(3)], atol=1e-12)
    y[:, 1] = 1  # one class only: undefined, not 0
    assert np.isnan(auroc(torch.from_numpy(s), torch.from_numpy(y)).numpy()[1])
    correct = rng.random((400, 2)) < np.array([0.6, 0.9])
    lo, hi = bootstrap_ci(correct.astype(float))
    assert (lo < correct.mean(0)).all() and (correct.mean(0) < hi).all() and (hi - lo < 0.12).all()


# --- checkpoints ----------------------------------------------------------------------------------------------------
def test_checkpoints_round_trip(tmp_path):
    z, y, split = planted()
    path = write_store(tmp_path / "planted.h5", z, y, split)
    for module, epochs in ((LinearProbes(controls=[]), 30), (LinearProbes(scope="layer", controls=[]), 30),
                           (SparseProbe(inner_steps=20), 2)):
        fit(module, path, epochs=epochs)
        folder = save_checkpoint(tmp_path / type(module).__name__, module.checkpoint_tensors(),
                                 module.checkpoint_config(), module.checkpoint_metrics())
        loaded = load_local(folder)
        zz = torch.from_numpy(z[:50]).float()
        np.testing.assert_allclose(loaded(zz).double().numpy(), module(zz).double().numpy(), rtol=1e-4, atol=1e-4)


def test_sparse_probe_on_a_subset_names_model_heads_and_keeps_its_norms_when_loaded(tmp_path):
    z, y, split = planted()  # label in (0, 1), (1, 2), (2, 3); the probe sees layers 1-2 and heads 1-3 only
    path = write_store(tmp_path / "planted.h5", z, y, split)
    module = SparseProbe(penalty="group_lasso", alpha=0.05, inner_steps=100)
    fit(module, path, epochs=3, layers=[1, 2], heads=[1, 2, 3])
    metrics = module.checkpoint_metrics()
    assert metrics["selected_heads"][:2] in ([[1, 2], [2, 3]], [[2, 3], [1, 2]]), metrics["selected_heads"]
    folder = save_checkpoint(tmp_path / "ck", module.checkpoint_tensors(), module.checkpoint_config(), metrics)
    loaded = load_local(folder)
    np.testing.assert_allclose(loaded.group_norm().numpy(), module.group_norm().numpy(), rtol=1e-6)
    assert loaded.checkpoint_metrics()["selected_heads"] == metrics["selected_heads"]


def test_undefined_metrics_are_saved_as_strict_json_nulls(tmp_path):
    z, y, split = planted()
    module = SparseProbe(inner_steps=5)
    fit(module, write_store(tmp_path / "planted.h5", z, y, split), epochs=1)
    metrics = {**module.checkpoint_metrics(), "val/auroc": float("nan"), "scores": [np.float32(0.5), np.inf]}
    folder = save_checkpoint(tmp_path / "ck", module.checkpoint_tensors(), module.checkpoint_config(), metrics)
    saved = json.loads((folder / "metrics.json").read_text(), parse_constant=pytest.fail)  # NaN would call fail
    assert saved["val/auroc"] is None and saved["scores"] == [0.5, None]
    assert saved["val/acc"] == pytest.approx(module.summary["val/acc"])


def test_unlabelled_store_is_refused(tmp_path):
    z, y, split = planted(n=60)
    path = write_store(tmp_path / "u.h5", z, None, split, label_kind="none")
    with pytest.raises(ValueError, match="no labels"):
        fit(LinearProbes(), path)
