"""`headprobe train`: the store DataModule, the CLI, the offline W&B run, exact resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from headprobe.extract.store import write_array_store as write_store
from headprobe.probes.checkpoint import load_local
from headprobe.train.data import StoreDataModule
from headprobe.train.fit import MODELS, TrainError
from headprobe.train.train_cli import expand_short_form, run
from headprobe.train.loggers import read_offline_run
from helpers import planted


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    z, y, split = planted(n=700)
    return write_store(tmp_path_factory.mktemp("store") / "planted.h5", z, y, split)


def epoch_rows(dm: StoreDataModule, epoch: int) -> np.ndarray:
    loader = dm.train_dataloader()
    loader.epoch_of = lambda: epoch  # what the trainer's epoch count gives inside fit
    return np.concatenate([b["row"].numpy() for b in loader])


# --- data ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [True, False])
def test_datamodule_epochs_cover_the_split_in_an_order_fixed_by_seed_and_epoch(store, in_memory):
    orders = {}
    for workers in (0, 2):
        dm = StoreDataModule(str(store), batch_size=32, in_memory=in_memory, num_workers=workers,
                             shuffle_buffer=256, block_chunks=1, seed=1)  # 3 blocks of 256 rows
        train = dm.split_rows["train"]
        for epoch in (0, 1):
            rows = epoch_rows(dm, epoch)
            assert sorted(rows.tolist()) == sorted(train.tolist())  # every train row once
            orders[workers, epoch] = rows
        assert not np.array_equal(orders[workers, 0], orders[workers, 1])
        assert np.array_equal(epoch_rows(dm, 1), orders[workers, 1])  # same (seed, epoch): same order
    if in_memory:  # the in-memory order does not depend on the number of workers
        assert np.array_equal(orders[0, 0], orders[2, 0])
    batch = next(iter(StoreDataModule(str(store), batch_size=0, in_memory=in_memory).val_dataloader()))
    assert batch["z"].dtype == torch.float32 and batch["z"].shape[1:] == (3, 4, 8)


# --- CLI ----------------------------------------------------------------------------------------------------------
def test_short_form_maps_names_to_configs(monkeypatch):
    args = expand_short_form(["linear", "--data.path", "x.h5"])
    assert args[0] == "--config" and args[1].endswith("train/configs/linear.yaml")
    assert args[2:] == ["--data.path", "x.h5"]
    assert expand_short_form(["--config", "my.yaml"]) == ["--config", "my.yaml"]
    monkeypatch.setitem(MODELS, "sae", ("headprobe.probes.not_there", "sae.yaml"))
    with pytest.raises(TrainError, match="headprobe.probes.not_there"):
        expand_short_form(["sae"])
    assert expand_short_form(["linear"])[1].endswith("linear.yaml")  # other subcommands still work


def headprobe(args: list[str], home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / "no-netrc"), **env_vars)
    return subprocess.run([sys.executable, "-m", "headprobe.train.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_print_config_and_overrides(store, tmp_path):
    res = headprobe(["linear", "--data.path", str(store), "--model.l2", "0.5", "--print_config"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "class_path: headprobe.probes.linear.LinearProbes" in res.stdout and "l2: 0.5" in res.stdout


def test_train_run_leaves_checkpoint_tables_heatmap_and_an_offline_wandb_run(store, tmp_path):
    out, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    res = headprobe(["linear", "--data.path", str(store), "--out", str(out), "--model.controls", "[control]"], home)
    assert res.returncode == 0, res.stderr[-3000:]
    # no credentials -> offline, and every W&B file under the run folder
    assert not [p for p in home.rglob("*") if "wandb" in p.name]
    run_dir = next((out / "wandb").glob("offline-run-*"))
    logged = read_offline_run(run_dir)
    keys = set().union(*logged["history"])
    assert {"val/acc_max", "val/acc_mean", "test/acc_max", "val/selectivity_control_max"} <= keys
    image = next(h for h in logged["history"] if "heatmap/_type" in h)
    assert image["heatmap/_type"] == "images/separated"
    assert all((run_dir / "files" / f).is_file() for f in image["heatmap/filenames"])
    assert logged["config"]["cli"]["model"]["class_path"] == "headprobe.probes.linear.LinearProbes"
    assert any(name.startswith("LinearProbes-synthetic") for name in logged["artifacts"])
    # the run folder in the project's formats
    probes = load_local(out / "checkpoint")
    assert probes.checkpoint_config_loaded.task == "synthetic" and probes.checkpoint_config_loaded.layers == [0, 1, 2]
    table = (out / "heads.csv").read_text().splitlines()
    assert len(table) == 1 + 12 and "val/acc" in table[0] and "test/auroc" in table[0]
    best = max(json.loads((out / "heads.json").read_text())["heads"], key=lambda r: r["val/acc"])
    assert (best["layer"], best["head"]) in {(0, 1), (1, 2), (2, 3)}
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


# --- exact resume ---------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_matches_an_uninterrupted_run(store, tmp_path):
    # minibatch proximal steps on shuffled, streamed data read by 2 workers: the result depends on the data order
    common = ["sparse", "--data.path", str(store), "--data.batch_size", "32", "--data.in_memory", "false",
              "--data.num_workers", "2", "--data.shuffle_buffer", "64", "--data.block_chunks", "1",
              "--model.momentum", "false",
              "--model.inner_steps", "1", "--model.lr", "0.05", "--model.tol", "0", "--trainer.max_epochs", "4",
              "--logger", "none"]
    run(expand_short_form([*common, "--out", str(tmp_path / "straight")]))
    crash = '--trainer.callbacks+={"class_path": "helpers.CrashAt", "init_args": {"epoch": 2}}'
    with pytest.raises(RuntimeError, match="killed"):
        run(expand_short_form([*common, "--out", str(tmp_path / "resumed"), crash]))
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    run(expand_short_form([*common, "--out", str(tmp_path / "resumed"), "--resume", "true"]))
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    ma = json.loads((tmp_path / "straight" / "checkpoint" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed" / "checkpoint" / "metrics.json").read_text())
    for key in ("val/loss", "val/acc", "test/loss", "test/acc"):
        assert abs(ma[key] - mb[key]) <= 1e-6
    # and the data order matters: another data seed ends elsewhere
    run(expand_short_form([*common, "--out", str(tmp_path / "other"), "--data.seed", "7"]))
    c = load_file(tmp_path / "other" / "checkpoint" / "model.safetensors")
    assert float((a["weight"] - c["weight"]).abs().max()) > 1e-4


def test_an_existing_run_is_refused_without_resume_or_overwrite_and_csv_resume_keeps_its_metrics(store, tmp_path):
    """A forgotten --resume, a resume with other settings, and a CSV resume all lose nothing."""
    out = tmp_path / "run"
    common = ["linear", "--data.path", str(store), "--out", str(out), "--logger", "csv"]
    run(expand_short_form(common))
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "val/acc_max" in metrics
    with pytest.raises(TrainError, match=r"holds a run .*--resume true.*--overwrite true"):
        run(expand_short_form([*common, "--model.l2", "5"]))  # a forgotten --resume loses nothing
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights
    with pytest.raises(TrainError, match=r"trained with --model.l2 1.0, this run asks for 5.0"):
        run(expand_short_form([*common, "--resume", "true", "--model.l2", "5"]))
    with pytest.raises(TrainError, match=r"trained with --data.seed 0, this run asks for 3"):
        run(expand_short_form([*common, "--resume", "true", "--data.seed", "3"]))
    run(expand_short_form([*common, "--resume", "true"]))  # finished already: tests and exports again
    assert (out / "csv" / "metrics.csv").read_text() == metrics  # Lightning would have emptied a reused folder
    assert "test/acc_max" in (out / "csv" / "resume-1" / "metrics.csv").read_text()
    with pytest.raises(TrainError, match=r"trained with --data.batch_size 0, this run asks for 256"):
        run(expand_short_form([*common, "--resume", "true", "--data.batch_size", "256"]))
    run(expand_short_form([*common, "--model.l2", "1000", "--overwrite", "true"]))
    assert (out / "checkpoint" / "model.safetensors").read_bytes() != weights
    assert not (out / "csv" / "resume-1").exists()  # the old run's files went first


def test_resume_on_a_rebuilt_store_is_refused(store, tmp_path):
    import h5py

    path = tmp_path / "store.h5"
    shutil.copy(store, path)
    common = ["linear", "--data.path", str(path), "--out", str(tmp_path / "run"), "--logger", "none"]
    run(expand_short_form(common))
    run(expand_short_form([*common, "--resume", "true"]))  # the same store: fine
    with h5py.File(path, "r+") as f:  # what `headprobe extract --overwrite` with another seed leaves at the path
        f.attrs["dataset_hash"] = "another"
    with pytest.raises(TrainError, match=r"is not the store .* rebuilt: dataset_hash 'another' != 'x'"):
        run(expand_short_form([*common, "--resume", "true"]))


def test_resume_never_unpickles_a_hostile_last_ckpt(store, tmp_path):
    """A last.ckpt whose unpickling would run code (here: make a folder) is refused in one line, in torch's zip
    format or as a bare pickle, and the code never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    state = {"state_dict": Hostile(), "pytorch-lightning_version": "2.6.6"}
    pickle.loads(pickle.dumps(state))  # the file is really hostile: plain unpickling runs its code
    assert marker.is_dir()
    marker.rmdir()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    argv = ["linear", "--data.path", str(store), "--out", str(tmp_path / "run"), "--logger", "none", "--resume", "true"]
    for write in (lambda: torch.save(state, ckpt), lambda: ckpt.write_bytes(pickle.dumps(state, protocol=4))):
        write()
        with pytest.raises(TrainError, match=r"last.ckpt holds objects other than tensors.*--overwrite true") as err:
            run(expand_short_form(argv))
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value) and not marker.exists()
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_lightning_console_lines_wait_for_training_and_vanish_when_a_setting_is_refused(store, tmp_path):
    """Lightning's lines (the seed, the devices) print once training starts; a setting refused before then leaves
    only its one-line error."""
    import logging

    import lightning as L

    from headprobe.train.callbacks import LIGHTNING_CONSOLE, HoldConsole

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    seen, lines, loggers = [], Lines(), [logging.getLogger(name) for name in LIGHTNING_CONSOLE]
    for logger in loggers:
        logger.addHandler(lines)
    try:
        before = [list(logger.handlers) for logger in loggers]
        with HoldConsole() as hold:
            L.seed_everything(3)
            assert seen == []
            hold.on_fit_start(None, None)
            assert seen == ["Seed set to 3"]
        with pytest.raises(RuntimeError), HoldConsole():
            L.seed_everything(4)
            raise RuntimeError("refused")
        assert seen == ["Seed set to 3"] and [list(logger.handlers) for logger in loggers] == before
        common = ["linear", "--data.path", str(store), "--out", str(tmp_path / "run"), "--logger", "none"]
        with pytest.raises(TrainError, match="--trainer.max_steps 0 trains nothing"):
            run(expand_short_form([*common, "--trainer.max_steps", "0"]))
        assert seen == ["Seed set to 3"]
        run(expand_short_form(common))
        assert seen[1:3] == ["Seed set to 0", "GPU available: False, used: False"], seen
    finally:
        for logger in loggers:
            logger.removeHandler(lines)


def test_wandb_mode_disabled_writes_no_wandb_files(store, tmp_path):
    out, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    res = headprobe(["linear", "--data.path", str(store), "--out", str(out)], home, WANDB_MODE="disabled")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert not (out / "wandb").exists() or not any((out / "wandb").glob("*run-*"))


def test_pipeline_restarts_an_interrupted_training_whose_settings_changed(store, tmp_path):
    """`headprobe run` resumes a training it left unfinished only with the same settings; with others (no finished
    step marker to compare with) it starts that training over instead of resuming or refusing."""
    from types import SimpleNamespace

    from headprobe.train.pipeline import Pipeline

    folder = tmp_path / "linear"
    pipeline = SimpleNamespace(cfg=SimpleNamespace(logger="none", seed=0))
    l2 = lambda value: {"model": {"init_args": {"l2": value}}}  # noqa: E731
    Pipeline._train(pipeline, "linear", store, folder, l2(1.0), None, digest="A")
    shutil.rmtree(folder / "checkpoint")  # as if killed after the last epoch's checkpoint, before the export
    Pipeline._train(pipeline, "linear", store, folder, l2(1.0), None, digest="A")  # resumes
    assert (folder / "checkpoint" / "model.safetensors").is_file() and (folder / "step_key").read_text() == "A"
    shutil.rmtree(folder / "checkpoint")
    metrics = Pipeline._train(pipeline, "linear", store, folder, l2(50.0), None, digest="B")
    assert (folder / "step_key").read_text() == "B" and "val/acc_max" in metrics
    assert json.loads((folder / "checkpoint" / "config.json").read_text())["hparams"]["l2"] == 50.0


def test_layers_or_heads_outside_the_store_are_refused_in_one_line(store):
    with pytest.raises(ValueError, match=r"--data.layers \[5\]: pick from 0..2"):
        StoreDataModule(str(store), layers=[5])
    with pytest.raises(ValueError, match=r"--data.heads \[\]: pick from 0..3"):
        StoreDataModule(str(store), heads=[])


@pytest.mark.parametrize("key,saved,now", [("seed", 3, 0), ("momentum", True, False), ("lr", 1e-3, 0.0),
                                           ("loss", "logistic", "ridge"), ("betas", (0.9, 0.999), (0.8, 0.999))])
def test_resume_check_catches_changes_to_zero_false_and_other_values(tmp_path, key, saved, now):
    from types import SimpleNamespace

    from headprobe.train.fit import check_resume

    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {key: saved, "n_layers": 30, "loss": "logistic" if key != "loss" else saved},
                "datamodule_hyper_parameters": {"path": str(tmp_path / "a.h5")}}, ckpt)
    data = SimpleNamespace(hparams={"path": str(tmp_path / "a.h5")})
    fresh = {"n_layers": 0, "loss": "auto"}  # filled in from the data at setup: not a change
    check_resume(ckpt, SimpleNamespace(hparams={**fresh, key: saved} if key != "loss" else fresh), data)
    with pytest.raises(TrainError, match=f"--model.{key} "):
        check_resume(ckpt, SimpleNamespace(hparams={**fresh, key: now}), data)


def test_bad_train_input_gives_one_line_errors_before_training(store, tmp_path, capsys):
    """Parse errors (jsonargparse's are many lines), unknown models, bad settings and data a probe cannot use all end
    in one line, exit 2, with nothing trained."""
    from headprobe.train.cli import main

    z, _, split = planted(n=40)
    one = write_store(tmp_path / "one.h5", z, np.zeros(40, dtype=np.int64), split)
    base = ["--data.path", str(store), "--out", str(tmp_path / "run"), "--logger", "none"]
    for argv, message in [
            (["foo"], "unknown model 'foo': choose one of linear, sparse, sae"),
            (["linear", *base, "--model.l2", "abc"], "--model.l2: Expected a float. Got value: abc (`headprobe train"),
            (["linear", *base, "--model.nosuch", "3"], "--model: Option 'nosuch' is not accepted"),
            (["linear", *base, "--trainer.max_epochs", "x"], "--trainer.max_epochs: expected int or null, got 'x'"),
            (["linear", *base, "--model.l2", "-1"], "--model.l2 -1.0: the ridge penalty must be 0 or more"),
            (["sparse", *base, "--model.alpha", "0"], "--model.alpha 0.0, --model.l1_ratio 0.5: alpha must be above 0"),
            (["linear", "--data.path", str(one), "--out", str(tmp_path / "run"), "--logger", "none"],
             "every training row has the label 'no': a probe needs rows of two labels or more")]:
        with pytest.raises(SystemExit) as exit_:
            main(["train", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("headprobe: error: "), err
        assert message in err, err
        assert not (tmp_path / "run" / "checkpoint").exists()
    main(["train"])
    assert "headprobe train {linear,sparse,sae}" in capsys.readouterr().out


def test_an_sae_too_big_for_the_machine_is_refused_before_allocation():
    from headprobe.probes.sae import SparseAutoencoder

    with pytest.raises(ValueError, match=r"an SAE of 2000000 latents on 1000000 inputs needs ~\d+ GB .* \(--data.layers\)"):
        SparseAutoencoder(d_in=1_000_000, d_sae=2_000_000)
