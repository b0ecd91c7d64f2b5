"""Planted heads recovered through the real pipeline: stores -> LinearProbes / SparseProbe / SparseAutoencoder
checkpoints -> evidence -> stage map, and ``headprobe attribute`` on a run folder."""
from __future__ import annotations

import csv

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from headprobe.extract.store import Store
from headprobe.extract.store import write_array_store as write_store
from headprobe.probes.attribution import evidence_from_checkpoints
from headprobe.probes.attribution.stage_map import build_stage_map
from headprobe.probes.checkpoint import export, save_checkpoint
from headprobe.probes.linear import LinearProbes
from headprobe.probes.sae import SparseAutoencoder
from headprobe.probes.sparse import SparseProbe
from headprobe.train.cli import main as headprobe
from headprobe.train.data import StoreDataModule
from helpers import L as N_LAYERS
from helpers import make_store, make_tasks, planted_map


def trainer(**kw) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, accelerator="cpu", **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder: one labelled store per synthetic task, an unlabelled corpus store, and checkpoints."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    tasks = make_tasks(seed=0)
    for t in tasks:
        split = np.zeros(len(t.labels), np.int8)
        split[t.val] = 1
        path = write_store(root / "stores" / f"{t.name}.h5", t.z, t.labels, split)
        with h5py.File(path, "r+") as f:
            f.attrs["task"], f.attrs["stage"] = t.name, t.stage
        for module, epochs in ((LinearProbes(controls=["shuffled"]), 30),
                               (SparseProbe(penalty="group_lasso", alpha=0.1, inner_steps=100), 10)):
            trainer(max_epochs=epochs).fit(module, datamodule=StoreDataModule(str(path)))
            save_checkpoint(root / "ckpt" / f"{type(module).__name__}-{t.name}", module.checkpoint_tensors(),
                            module.checkpoint_config(), module.checkpoint_metrics())
    corpus = make_store(root / "corpus.h5", np.concatenate([t.z for t in tasks]))
    for layer in range(N_LAYERS):
        sae = SparseAutoencoder(architecture="topk", d_sae=32, k=4, lr=1e-2, warmup_steps=2, seed=layer)
        trainer(max_steps=200, limit_val_batches=0).fit(
            sae, datamodule=StoreDataModule(corpus, layers=[layer], batch_size=256))
        export(sae, root / "ckpt" / f"sae-l{layer}")
    torch.set_num_threads(before)
    return root


@pytest.mark.parametrize("cls", ["LinearProbes", "SparseProbe", "sae"])
def test_checkpoints_put_exactly_the_planted_heads_at_their_stages(run_dir, cls):
    stores = [Store(p) for p in sorted((run_dir / "stores").glob("*.h5"))] + [Store(run_dir / "corpus.h5")]
    evidence = evidence_from_checkpoints(sorted((run_dir / "ckpt").glob(f"{cls}*")), stores)
    source = {"LinearProbes": "linear", "SparseProbe": "sparse", "sae": "sae"}[cls]
    assert len(evidence) == 5 and {ev.source for ev in evidence} == {source}
    stage_map = build_stage_map(evidence)
    assert stage_map.assigned() == planted_map()


def test_attribute_command_on_a_run_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "attr"
    headprobe(["attribute", str(run_dir), "--out", str(out), "--top", "3"])
    with open(out / "stage_scores.csv") as f:
        got = {(int(r["layer"]), int(r["head"])): r["stage"] for r in csv.DictReader(f) if r["stage"]}
    assert got == planted_map()  # linear, sparse and SAE evidence pooled
    report = (out / "report.md").read_text()
    assert "## Stage map" in report and "![stage map](stage_map.png)" in report and (out / "stage_map.png").stat().st_size
    assert "kr_a/sae" in report and "lr/sparse" in report
    assert "14 checkpoints, 6 stores" in capsys.readouterr().out


def test_attribute_refuses_an_earlier_attribution_unless_overwrite_which_leaves_nothing_stale(run_dir, tmp_path,
                                                                                                 capsys):
    out = tmp_path / "attr"
    headprobe(["attribute", str(run_dir), "--out", str(out)])
    before = (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exc:
        headprobe(["attribute", str(run_dir), "--out", str(out), "--top", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds an attribution (report.md): pass --overwrite" in err and err.count("\n") == 1
    assert (out / "report.md").read_text() == before
    (out / "ablation.json").write_text("{}")  # as left by an earlier run with --ablate
    headprobe(["attribute", str(run_dir), "--out", str(out), "--top", "3", "--overwrite"])
    assert not (out / "ablation.json").exists() and (out / "report.md").exists() and (out / "stage_scores.csv").exists()
    with pytest.raises(SystemExit) as exc:
        headprobe(["attribute", str(run_dir), "--out", str(tmp_path / "other"), "--alpha", "2"])
    assert exc.value.code == 2 and "'2': a level between 0 and 1" in capsys.readouterr().err


def test_attribute_command_errors(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "empty")], "no checkpoint found"),
                          ([str(tmp_path / "missing")], "does not exist"),
                          ([str(run_dir / "ckpt"), "--head-scores", "--model", str(tmp_path / "nomodel")],
                           "not a model folder")]:
        with pytest.raises(SystemExit) as exc:
            headprobe(["attribute", *argv, "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("headprobe: error:") and message in err and err.count("\n") == 1
