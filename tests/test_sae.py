"""Sparse autoencoders: the fused TopK kernel, normalisation folding, AuxK, dictionary recovery, every architecture
through Lightning and the checkpoint format, and splicing into a model."""
from __future__ import annotations

import json
import re
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from headprobe import InputError
from headprobe.extract.store import Store
from headprobe.probes.checkpoint import export, load_local
from headprobe.probes.sae import ARCHITECTURES, SAEWarning, SparseAutoencoder, fve, topk_sae
from headprobe.probes.sae_eval import ce_loss_recovered, evaluate, splice, token_batches
from headprobe.train.data import EpochBatches, InMemoryRows, StoreDataModule
from headprobe.train.fit import CONFIGS
from helpers import make_store, run_cli_split, tiny_model


def sparse_data(n: int, d: int, n_atoms: int, k: int, seed: int = 0, scale: float = 1.0, offset: float = 0.0):
    """x = sum of k random unit atoms with magnitudes in [0.5, 1.5]; returns (x (n, d), atoms (n_atoms, d))."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :k]
    mags = 0.5 + torch.rand(n, k, generator=g)
    x = torch.einsum("nk,nkd->nd", mags, atoms[idx])
    return x * scale + offset, atoms


def quiet_trainer(**kw) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", **kw)


def test_fused_topk_backward_equals_dense_autograd():
    torch.manual_seed(0)
    B, d, n, k, k_aux = 16, 12, 40, 5, 4
    leaves = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(B, d), (n, d), (n,), (n, d), (d,)]]
    x, W_enc, b_enc, W_dec, b_dec = leaves
    dead = torch.tensor([1, 3, 7, 8, 20, 33, 39])
    G, G_aux = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)

    x_hat, vals, _, aux_hat, _, _ = topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)
    fused = (x_hat * G).sum() + (aux_hat * G_aux).sum() + vals.pow(2).sum()

    pre = (x - b_dec) @ W_enc.T + b_enc
    v, i = pre.topk(k, dim=1)
    f = torch.zeros_like(pre).scatter(1, i, v.relu())
    va, j = pre[:, dead].topk(k_aux, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, dead[j], va.relu())
    dense = ((f @ W_dec + b_dec) * G).sum() + ((f_aux @ W_dec) * G_aux).sum() + f.pow(2).sum()

    torch.testing.assert_close(fused, dense)
    for a, b in zip(torch.autograd.grad(fused, leaves), torch.autograd.grad(dense, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k_aux", [3, 40])
def test_auxk_of_the_dense_paths_equals_the_fused_kernel(k_aux):
    """Unfused TopK gives the AuxK loss of the fused kernel (checked against dense autograd above), whether k_aux picks
    among the dead latents or takes all of them; BatchTopK runs the same AuxK lines."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    dead = torch.tensor([2, 5, 6, 11, 17, 30, 41, 47])  # in no particular order of pre-activation
    aux = {}
    for name, kw in [("fused", {}), ("unfused", {"fused": False})]:
        sae = SparseAutoencoder(d_in=16, d_sae=48, k=4, k_aux=k_aux, dead_after_tokens=10, seed=3, **kw)
        sae.tokens_since_fired[dead] = 100
        aux[name] = sae.loss(x)[1]["train/auxk"]
    torch.testing.assert_close(aux["unfused"], aux["fused"])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalisation_folded_on_save(tmp_path, arch):
    x, _ = sparse_data(512, 24, 48, 3, scale=37.0, offset=5.0)  # raw activations far from unit scale
    sae = SparseAutoencoder(architecture=arch, d_in=24, d_sae=64, k=4, seed=1)
    sae.initialise(x)
    assert abs(float(sae.input_scale) - (24 / x.pow(2).sum(1).mean()).sqrt()) < 1e-4
    opt = torch.optim.Adam(sae.parameters(), 1e-2)
    for _ in range(5):  # move every weight away from its initial value
        loss, _ = sae.loss(x * sae.input_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sae.eval()
    meta = Store(make_store(tmp_path / "s.h5", x.view(-1, 1, 4, 6).numpy())).meta
    loaded = load_local(export(sae, tmp_path / "ckpt", meta))
    assert float(loaded.input_scale) == 1.0 and loaded.hparams.architecture == arch
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5 * x.abs().max().item())
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_a_new_architecture_is_one_registered_object(tmp_path, monkeypatch):
    """An architecture with a parameter of its own trains, saves and loads without a change to the module."""
    from headprobe.probes.sae_arch import ReLU

    class Shrink(ReLU):  # ReLU above a learned per-latent offset, with ReLU's weighted L1
        name = "shrink"

        def extra_parameters(self, n, hp):
            return {"offset": torch.full((n,), 0.1)}

        def train_activate(self, sae, pre):
            return super().train_activate(sae, pre - sae.offset)

        def latents(self, sae, pre):
            return (pre - sae.offset).relu()

    monkeypatch.setitem(ARCHITECTURES, "shrink", Shrink)
    x, _ = sparse_data(256, 24, 48, 3, scale=4.0)
    sae = SparseAutoencoder(architecture="shrink", d_in=24, d_sae=64, seed=1)
    sae.initialise(x)
    opt = torch.optim.Adam(sae.parameters(), 1e-2)
    for _ in range(5):
        loss, logs = sae.loss(x * sae.input_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "train/sparsity" in logs and not torch.allclose(sae.offset, torch.full((64,), 0.1))
    meta = Store(make_store(tmp_path / "s.h5", x.view(-1, 1, 4, 6).numpy())).meta
    loaded = load_local(export(sae.eval(), tmp_path / "ckpt", meta))
    torch.testing.assert_close(loaded.offset, sae.offset.detach())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-4)


def test_auxk_revives_dead_latents():
    x, _ = sparse_data(4096, 32, 24, 3, seed=2)
    x[:, 16:] = 0  # the data lives in the first 16 dimensions

    def train(alpha: float) -> tuple[float, float]:
        sae = SparseAutoencoder(d_in=32, d_sae=32, k=3, auxk_alpha=alpha, k_aux=16, dead_after_tokens=512,
                                input_norm="none", b_dec_init="mean", seed=0)
        sae.initialise(x)
        with torch.no_grad():  # latents 8..31 look only at the empty dimensions: they (almost) never win
            sae.W_enc[8:, :16] = 0
            sae.W_enc[8:] /= sae.W_enc[8:].norm(dim=1, keepdim=True)
            sae.b_enc[8:] = 0.01
        opt = torch.optim.Adam(sae.parameters(), 5e-3)
        for _ in range(200):
            loss, _ = sae.loss(x[torch.randint(0, len(x), (256,))])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (sae.encode(x) > 0).any(0)[8:].float().mean().item(), fve(x, sae(x)).item()

    alive_without, fve_without = train(0.0)
    alive_with, fve_with = train(1 / 32)
    assert alive_without <= 0.3 and alive_with >= 0.8, (alive_without, alive_with)
    assert fve_with > fve_without + 0.05


def test_recovers_known_sparse_dictionary():
    torch.manual_seed(0)
    x, atoms = sparse_data(16384, 32, 48, 3, seed=3)
    sae = SparseAutoencoder(d_in=32, d_sae=96, k=3, lr=1e-2, warmup_steps=10, token_budget=len(x) * 4,
                            dead_after_tokens=4096, seed=0)
    rows = InMemoryRows(x.numpy(), -np.ones(len(x), np.int64), np.arange(len(x)))
    loader = torch.utils.data.DataLoader(rows, sampler=EpochBatches(len(x), 512, shuffle=True), batch_size=None)
    sae.initialise(x[:4096])
    quiet_trainer(max_epochs=8).fit(sae, loader)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best = (atoms @ W.T).max(1).values
    assert best.mean() >= 0.95, best
    assert int(sae.tokens_seen) == len(x) * 4  # the token budget, not max_epochs, ended training


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_and_round_trips(tmp_path, arch):
    x, _ = sparse_data(2048, 24, 40, 3, seed=4, scale=5.0, offset=1.0)
    path = make_store(tmp_path / "acts.h5", x.view(-1, 2, 3, 4).numpy())  # 2 layers x 3 heads x d_head 4
    dm = StoreDataModule(path, layers=[1], heads=[0, 2], batch_size=256)  # d_in = 1 * 2 * 4
    sae = SparseAutoencoder(architecture=arch, expansion=4, k=3, lr=1e-2, warmup_steps=2, seed=0)
    trainer = quiet_trainer(max_steps=40, val_check_interval=20, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(sae, datamodule=dm)
    assert sae.d_in == 8 and sae.d_sae == 32 and sae.layers == [1] and sae.heads == [0, 2]
    n_train = len(dm.split_rows["train"])
    sizes = [min(256, n_train - i) for i in range(0, n_train, 256)] * 10
    assert sae.global_step == 40 and int(sae.tokens_seen) == sum(sizes[:40])
    batches = lambda: (b["z"] for b in dm.test_dataloader())
    metrics = evaluate(sae, batches())
    assert metrics["fve"] > 0.3 and 0 < metrics["l0"] < 32, metrics
    loaded = load_local(export(sae, tmp_path / "ckpt"))
    assert loaded.layers == [1] and loaded.heads == [0, 2]
    again = evaluate(loaded, batches())
    for key in ("fve", "l0", "mse", "dead_frac"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6)


def test_token_budget_stops_training(tmp_path):
    x, _ = sparse_data(1250, 8, 16, 2)  # 1000 training rows
    dm = StoreDataModule(make_store(tmp_path / "a.h5", x.view(-1, 1, 2, 4).numpy()), batch_size=100)
    sae = SparseAutoencoder(expansion=2, k=2, token_budget=1000)
    quiet_trainer(max_epochs=50, limit_val_batches=0).fit(sae, datamodule=dm)
    assert int(sae.tokens_seen) == 1000 and sae.global_step == 10
    budget = SparseAutoencoder(expansion=2, k=2, token_budget=2500)  # no epoch limit: the budget's 3 epochs
    trainer = quiet_trainer(max_epochs=-1, limit_val_batches=0)
    trainer.fit(budget, datamodule=dm)
    assert int(budget.tokens_seen) == 2500 and trainer.current_epoch == 3 and budget.global_step == 25
    assert trainer.max_epochs == -1  # the module stopped itself; nothing rewrote the Trainer's limits


def shipped_settings(arch: str) -> dict:
    """The model settings `headprobe train sae` uses for ``arch``: sae.yaml, then sae_ARCH.yaml if there is one."""
    settings = yaml.safe_load((CONFIGS / "sae.yaml").read_text())["model"]["init_args"]
    overlay = CONFIGS / f"sae_{arch}.yaml"
    if overlay.exists():
        settings.update(yaml.safe_load(overlay.read_text())["model"]["init_args"])
    return settings


class Schedule(L.Callback):
    """Records the learning rate and the sparsity coefficient that each training step uses."""

    def __init__(self):
        self.lr, self.coeff = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.coeff.append(module.sparsity_coeff())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_ten_step_run_finishes_its_warmups_and_batchtopk_keeps_its_l0(tmp_path, arch):
    """On a 10-step run with the shipped settings (LR warm-up 10 steps, sparsity warm-up 50 for relu/jumprelu) the LR
    warm-up ends at once, the sparsity coefficient reaches full strength, and BatchTopK's inference threshold gives
    an L0 near its training k. Before: the LR peaked at the last step, the coefficient ended at 0.2 of full strength
    and BatchTopK's threshold (an EMA of momentum 0.99 from step 1) gave an inference L0 of 1.7 for k 16."""
    x, _ = sparse_data(2400, 64, 200, 12, seed=5, scale=3.0, offset=0.5)
    dm = StoreDataModule(make_store(tmp_path / "a.h5", x.view(-1, 2, 4, 8).numpy()), batch_size=256)  # 1,920 train
    settings = {**shipped_settings(arch), "expansion": 4, "k": 16, "token_budget": 1920 + 2 * 256}
    sae = SparseAutoencoder(**settings)
    schedule = Schedule()
    quiet_trainer(max_epochs=-1, limit_val_batches=0, callbacks=[schedule]).fit(sae, datamodule=dm)
    assert sae.global_step == 10 and sae.plan.steps == 10  # one epoch of 8 batches, then 2 more
    peak = 4e-3 / (sae.d_sae / 4096) ** 0.5  # lr 0 in sae.yaml
    assert settings["warmup_steps"] == 10 and sae.plan.warmup == 1
    assert schedule.lr[:8] == [pytest.approx(peak)] * 8  # then the decay over the last 20% of the budget
    if sae.arch.coeff_option:
        full = settings[sae.arch.coeff_option]
        assert settings["sparsity_warmup_steps"] == 50 and schedule.coeff[-1] == pytest.approx(full)
        assert schedule.coeff.index(schedule.coeff[-1]) <= 2  # 25% of the run
        assert any("warming up over 2 instead" in note for note in sae.notes)
    l0 = evaluate(sae, (b["z"] for b in dm.test_dataloader()))["l0"]
    if arch == "batchtopk":
        assert 16 / 1.5 <= l0 <= 16 * 1.5, l0


def test_a_threshold_average_starts_at_the_first_batch_and_spans_a_tenth_of_the_run():
    from headprobe.probes.sae_plan import plan_run, threshold_rate

    assert threshold_rate(0, 0.99) == 1.0 and threshold_rate(1, 0.99) == pytest.approx(0.01 / (1 - 0.99 ** 2))
    values, avg = [3.0, 1.0, 2.0], 0.0
    for t, v in enumerate(values):  # with a momentum this large against the run, the average is the plain mean
        avg += threshold_rate(t, 0.999999) * (v - avg)
    assert avg == pytest.approx(2.0, rel=1e-5)
    hp = SparseAutoencoder(batchtopk_momentum=0.99).hparams
    assert plan_run(hp, 1000).threshold_momentum == 0.99 and plan_run(hp, 200).threshold_momentum == pytest.approx(0.95)
    assert plan_run(hp, float("inf")).threshold_momentum == 0.99 and plan_run(hp, 9).threshold_momentum == 0.0


@pytest.mark.parametrize("kw, says", [
    ({"k": 40, "d_sae": 32}, r"--model.k 40 is more than the SAE's --model.d_sae 32: pass a smaller k or a larger"),
    ({"k": 40, "d_in": 8, "expansion": 4}, r"--model.k 40 is more than the SAE's 32 latents \(--model.expansion 4"),
    ({"k": 0}, r"--model.k 0: pass a positive number"),
    ({"architecture": "batchtopk", "k": -3}, r"--model.k -3: pass a positive number"),
    ({"d_sae": 0, "expansion": 0}, r"--model.d_sae 0 with --model.expansion 0 gives the SAE no latents"),
    ({"architecture": "relu", "l1_coeff": -0.1}, r"--model.l1_coeff -0.1: pass a coefficient >= 0"),
    ({"auxk_alpha": -1.0}, r"--model.auxk_alpha -1.0: pass a coefficient >= 0"),
    ({"architecture": "jumprelu", "jumprelu_theta": 0.0}, r"--model.jumprelu_theta 0.0: pass a threshold > 0"),
    ({"batchtopk_momentum": 1.0}, r"--model.batchtopk_momentum 1.0: pass a momentum in \[0, 1\)"),
    ({"architecture": "gated"}, r"unknown SAE architecture 'gated': choose one of relu, topk, batchtopk, jumprelu"),
])
def test_settings_that_cannot_train_are_refused_in_one_line(kw, says):
    with pytest.raises(InputError, match=says) as err:
        SparseAutoencoder(**kw)
    assert "\n" not in str(err.value)


def test_k_is_only_checked_where_the_architecture_reads_it():
    sae = SparseAutoencoder(architecture="relu", d_in=8, d_sae=16, k=40)  # relu has no k
    assert sae.d_sae == 16


def test_more_active_latents_than_inputs_are_refused_for_training_not_for_loading(tmp_path):
    x, _ = sparse_data(64, 8, 16, 2)
    sae = SparseAutoencoder(d_in=8, expansion=4, k=12)  # 32 latents hold k 12, but 12 of 8 dimensions is no code
    with pytest.raises(InputError, match=r"--model.k 12 is more than the SAE's 8 inputs \(d_in\).*smaller k"):
        sae.initialise(x)
    sae.initialised = True  # as a checkpoint trained before k was checked against d_in
    meta = Store(make_store(tmp_path / "s.h5", x.view(-1, 1, 2, 4).numpy())).meta
    assert load_local(export(sae, tmp_path / "ckpt", meta)).hparams.k == 12


def test_a_width_far_above_the_training_rows_is_warned_about_and_recorded(tmp_path):
    x, _ = sparse_data(500, 16, 32, 3, seed=6)  # 400 training rows
    store = make_store(tmp_path / "a.h5", x.view(-1, 1, 2, 8).numpy())
    code, _, err = run_cli_split(["train", "sae", "--data.path", store, "--out", str(tmp_path / "run"), "--logger",
                                  "none", "--trainer.enable_progress_bar", "false", "--model.init_args.d_sae", "512",
                                  "--model.init_args.k", "4", "--model.init_args.token_budget", "800"],
                                 tmp_path / "out.log")
    line = "the SAE's 512 latents are too many for 400 training rows (fewer than 4 rows per latent): it will memorise"
    assert code == 0, err[-3000:]
    assert re.search(re.escape(line) + r".*pass --model.d_sae 25 or fewer", err), err[-3000:]
    metrics = json.loads((tmp_path / "run" / "checkpoint" / "metrics.json").read_text())
    assert len(metrics["warnings"]) == 1 and metrics["warnings"][0].startswith(line)
    dm = StoreDataModule(store, batch_size=100)
    narrow = SparseAutoencoder(d_sae=64, k=4, token_budget=400)  # 6 rows per latent: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_epochs=-1, limit_val_batches=0).fit(narrow, datamodule=dm)
    assert not [w for w in caught if issubclass(w.category, SAEWarning)]
    assert narrow.warnings == [] and "warnings" not in narrow.checkpoint_metrics()


def test_splice_replaces_only_the_chosen_heads_and_identity_recovers_everything():
    model = tiny_model("llama")  # 6 heads x d_head 8
    batches = token_batches([[5, 9, 12, 40, 7, 3, 22], [8, 1, 4, 4, 90]], batch_size=2)
    seen = []
    with splice(model, 1, [2], lambda z: seen.append(z.shape) or torch.zeros_like(z)):
        with torch.no_grad():
            model(input_ids=batches[0][0])
    assert seen == [(2 * 7, 8)]

    class Identity(torch.nn.Module):
        layers, heads = [1], None

        def forward(self, z):
            return z

    out = ce_loss_recovered(model, Identity(), batches, mean_input=torch.zeros(48))
    assert out["ce_spliced"] == pytest.approx(out["ce_clean"], abs=1e-6)
    assert out["ce_zero_ablation"] != pytest.approx(out["ce_clean"], abs=1e-3)
    assert out["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    single = ce_loss_recovered(model, Identity(), batches, mean_input=torch.zeros(8), heads=[3])
    assert single["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert single["ce_zero_ablation"] != pytest.approx(out["ce_zero_ablation"], abs=1e-6)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_fused_batch_architectures_equal_their_dense_reference(arch):
    """BatchTopK and Matryoshka through the fused kernel: the same loss, gradients and threshold as dense autograd
    (Matryoshka's loss the mean FVU of the prefixes 1, 5, 20 and all 40 latents)."""
    torch.manual_seed(0)
    x = torch.randn(64, 12, dtype=torch.float64)
    x[:4] *= 10  # these rows keep more than 4k latents: the fused selection must widen its search to stay exact
    fused, dense = (SparseAutoencoder(architecture=arch, d_in=12, d_sae=40, k=3, fused=f, seed=1,
                                      matryoshka_prefixes=(0.025, 0.125, 0.5)).double() for f in (True, False))
    with torch.no_grad():
        for sae in (fused, dense):
            sae.b_enc.normal_(generator=torch.Generator().manual_seed(2))  # uneven latents: some rows keep many
    if arch == "matryoshka":
        assert fused.arch.widths(fused) == [1, 5, 20, 40]
    dead = torch.tensor([0, 5, 9, 33])
    grads = []
    for sae in (fused, dense):
        sae.loss(x)  # the first batch sets the threshold; the second moves it
        out = sae.arch.train_pass(sae, x, dead)
        loss = (out.recon if out.recon is not None else 1 - fve(x, out.x_hat)) + fve(x - out.x_hat, out.aux_hat)
        grads.append([loss, out.l0, sae.threshold.clone(),
                      *torch.autograd.grad(loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])])
    assert grads[0][1] == 3  # B * k kept over the batch
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if arch == "matryoshka":
        prefix_only = SparseAutoencoder(architecture=arch, d_in=12, d_sae=40, k=3, matryoshka_prefixes=(0.999,))
        assert prefix_only.arch.widths(prefix_only) == [40]
