"""The checkpoints shipped in checkpoints/: they verify, load offline, and reproduce their recorded metrics."""
from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from headprobe import probes
from headprobe.extract.store import Store
from headprobe.extract.tasks import TASKS
from headprobe.probes.hub import Registry, bundled_registry

LABELLED = {t.name for t in TASKS.values() if t.label_kind != "none"}


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HEADPROBE_REGISTRY", raising=False)


def test_every_shipped_checkpoint_verifies_and_loads(offline):
    registry = Registry.open()
    by_class = {}
    for ref, entry in registry.entries.items():
        by_class.setdefault(entry.cls, set()).add(entry.task)
        module = probes.load(ref)  # every file checked against its sha256 in the registry
        cfg = module.checkpoint_config_loaded
        assert type(module).__name__ == entry.cls == cfg.cls
        assert cfg.model_id == "smollm2-135m" and cfg.weights_hash == entry.weights_hash
        assert cfg.command == entry.command and cfg.command.startswith("headprobe extract ")
        assert entry.metrics and all(np.isfinite(v) for v in entry.metrics.values())
    assert by_class["LinearProbes"] == LABELLED and by_class["SparseProbe"] == LABELLED
    saes = [r for r, e in registry.entries.items() if e.cls == "SparseAutoencoder"]
    assert saes
    for ref in saes:
        entry = registry.entry(ref)
        fve = entry.metrics.get("val/fve", entry.metrics.get("test/fve"))
        assert entry.size_bytes <= 16 * 2**20 and 0.5 < fve <= 1
        from safetensors import safe_open

        with safe_open(bundled_registry().parent / entry.location / "model.safetensors", "pt") as f:
            assert f.get_tensor("W_dec").dtype == torch.float16
    assert sum(e.size_bytes for e in registry.entries.values()) < 30e6


def _fresh_extraction(command: str, out) -> Store:
    """Run the `headprobe extract` part of a recorded command, writing to ``out``."""
    from headprobe.train.cli import main

    argv = shlex.split(command.split(" && ")[0])[1:]
    argv[argv.index("--out") + 1] = str(out)
    main(argv)
    return Store(out)


@pytest.mark.slow
def test_shipped_probes_reproduce_their_val_metrics_on_a_fresh_extraction(offline, tmp_path):
    from headprobe.probes.sparse import SparseProbe

    linear, sparse = probes.load("v1/capitals-linear"), SparseProbe.from_pretrained("v1/capitals-sparse")
    cfg, metrics = linear.checkpoint_config_loaded, linear.checkpoint_metrics_loaded
    with _fresh_extraction(cfg.command, tmp_path / "capitals.h5") as store:
        assert store.meta.dataset_hash == cfg.data["dataset_hash"]
        cfg.check_compatible(store.meta)
        rows = store.rows("val")
        z = torch.from_numpy(np.asarray(store.activations(rows)).astype(np.float32))  # (N, L, H, D)
        y = torch.from_numpy(store.labels[rows]).double()
    with torch.no_grad():
        logits = linear(z)[..., 0]  # (N, L, H)
        acc = ((logits > 0).double() == y[:, None, None]).double().mean(0)
        loss = F.binary_cross_entropy_with_logits(logits, y[:, None, None].expand_as(logits), reduction="none").mean(0)
    np.testing.assert_array_equal(acc.numpy(), np.array(metrics["val"]["acc"][0]))
    assert float(acc.mean()) == pytest.approx(metrics["val/acc_mean"], abs=1e-12)
    assert float(loss.mean()) == pytest.approx(metrics["val/loss_mean"], rel=1e-6)
    assert Registry.open().entry("v1/capitals-linear").metrics["val/acc_mean"] == metrics["val/acc_mean"]

    with torch.no_grad():
        logit = sparse(z)[:, 0]
    recorded = sparse.checkpoint_metrics_loaded
    assert float(((logit > 0).double() == y).double().mean()) == recorded["val/acc"]
    assert float(F.binary_cross_entropy_with_logits(logit, y)) == pytest.approx(recorded["val/loss"], rel=1e-6)
