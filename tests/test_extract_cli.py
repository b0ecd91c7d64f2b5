"""Items 9 and 10 of the extraction issue, through the real CLI in subprocesses: kill -9 and resume, bad input.

The subprocesses are forked from a server that has imported torch and transformers once (tests/
helpers.py), so each starts in well under a second; one test runs the `headprobe` console script.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from headprobe.extract import ExtractConfig, ExtractError, Store, StoreError, extract
from headprobe.extract.models import LoadedModel, ModelLoadError, ModelSource, load_model, weights_fingerprint
from headprobe.extract.tasks import Example, Task, get_task
from helpers import (ByteTokenizer, assert_same_store, cli_process, interrupted, run_cli, save_model_folder, tiny_loaded,
                     tiny_model)

SLOW_ARGS = ["--positions", "all", "--writes", "--block-examples", "2", "--batch-tokens", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _read(path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _rows_done(progress) -> int:
    """Rows an extraction has committed, from its progress sidecar (replaced atomically); -1 before it exists."""
    try:
        return json.loads(progress.read_text())["rows_done"]
    except FileNotFoundError:
        return -1


def _watch(proc, progress, until) -> tuple[list[int], list[float]]:
    """Poll a run's progress sidecar until ``until(rows)`` holds or the run ends (2 min at most).

    Returns every committed-row count it showed (the sidecar is read even while it still holds the previous
    run's last commit, which is where a resumed run starts) and the times at which the count changed.
    """
    seen, changes, deadline = [], [], time.monotonic() + 120
    while proc.is_alive() and time.monotonic() < deadline:
        rows = _rows_done(progress)
        if rows >= 0:
            if seen and rows != seen[-1]:
                changes.append(time.monotonic())
            seen.append(rows)
            if until(rows):
                break
        time.sleep(0.001)
    return seen, changes


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_file(tmp_path, model_folder):
    reference = tmp_path / "reference.h5"
    cfg = ExtractConfig(positions="all", writes=True, block_examples=2, batch_tokens=32)
    extract(load_model(model_folder), get_task("capitals"), reference, cfg, progress=False)
    with h5py.File(reference, "r") as f:
        n_rows = len(f["z"])

    out = tmp_path / "run.h5"
    partial, progress = tmp_path / "run.h5.partial", tmp_path / "run.h5.partial.json"
    argv = ["extract", "--model", model_folder, "--task", "capitals", "--out", str(out), "--resume", *SLOW_ARGS]
    rng = np.random.default_rng(0)
    # Each run is watched from its start: the committed rows it shows must never fall below what the previous run
    # had committed when killed (a run that started again from row 0 commits 0 first). Once they pass a target
    # (rising across runs, jittered) it is killed after a random fraction of one block's time, so the kill lands
    # anywhere in the next block's forward, write or commit. Polling the progress file rather than timing from the
    # start keeps this independent of how fast the machine is.
    targets = (np.array([0.15, 0.35, 0.55, 0.75]) + rng.uniform(0, 0.05, 4)) * n_rows
    killed_at = [0]
    for attempt, target in enumerate(targets):
        proc = cli_process(argv, tmp_path / f"log{attempt}")
        seen, commit_times = _watch(proc, progress, until=lambda rows: rows >= target)
        block_time = np.diff(commit_times).mean() if len(commit_times) > 1 else 0.01
        time.sleep(rng.uniform(0, 0.8) * block_time)
        assert proc.is_alive(), f"run {attempt} ended before it was killed: {_read(tmp_path / f'log{attempt}')}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL and not out.exists()
        assert min(seen) >= killed_at[-1], f"run {attempt} went back from row {killed_at[-1]} to {min(seen)}"
        killed_at.append(_rows_done(progress))
        assert target <= killed_at[-1] < n_rows, (target, killed_at)
    print("rows committed when killed:", killed_at[1:], "of", n_rows)
    proc = cli_process(argv, tmp_path / "final.log")
    seen, _ = _watch(proc, progress, until=lambda rows: False)
    proc.join(30)
    assert proc.exitcode == 0, _read(tmp_path / "final.log")
    assert min(seen, default=killed_at[-1]) >= killed_at[-1], (killed_at[-1], min(seen))
    assert not partial.exists() and not progress.exists()
    assert_same_store(out, reference)
    with Store(out) as s:
        assert len(s) == n_rows == s.meta.n_rows


def test_resume_with_other_model_task_or_settings_is_refused(tmp_path):
    loaded, task = tiny_loaded("qwen2"), get_task("capitals")
    cfg = ExtractConfig(block_examples=16, batch_tokens=64, store_dtype="fp32")
    out = tmp_path / "r.h5"
    interrupted(loaded, task, out, cfg)
    other_model = tiny_model("qwen2", seed=1)
    others = [
        (loaded, task, ExtractConfig(block_examples=16, batch_tokens=64, store_dtype="fp32", layers=[0]), "config"),
        (loaded, task, ExtractConfig(block_examples=16, batch_tokens=64), "dtype"),
        (loaded, task, ExtractConfig(block_examples=16, batch_tokens=64, store_dtype="fp32", seed=1), "dataset_hash"),
        (loaded, get_task("corpus"), cfg, "task"),
        (LoadedModel(other_model, ByteTokenizer(1), "tiny-qwen2", weights_fingerprint(other_model)), task, cfg,
         "weights_hash"),
    ]
    for other_loaded, other_task, other_cfg, field in others:
        with pytest.raises(StoreError, match=rf"another model, task or configuration \({field} .*--overwrite"):
            extract(other_loaded, other_task, out, other_cfg, resume=True, progress=False)
    resumed = extract(loaded, task, out, cfg, resume=True, progress=False)  # the partial is still usable
    straight = extract(loaded, task, tmp_path / "s.h5", cfg, progress=False)
    assert_same_store(resumed, straight)
    with pytest.raises(ExtractError, match=r"another model, task or configuration \(config"):
        extract(loaded, task, out, ExtractConfig(layers=[1], block_examples=16, batch_tokens=64, store_dtype="fp32"),
                resume=True, progress=False)
    assert extract(loaded, task, out, cfg, resume=True, progress=False) == out  # finished: nothing to do


def one_line_error(code: int, log: str, *fragments: str) -> None:
    assert code == 2, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if line.startswith("headprobe: error: ")]
    assert len(errors) == 1 and errors[0] == log.rstrip("\n").splitlines()[-1], log
    for fragment in fragments:
        assert fragment in errors[0], log


def test_cli_bad_input_gives_one_line_errors_and_no_complete_looking_file(tmp_path, model_folder):
    out = tmp_path / "x.h5"
    base = ["extract", "--task", "capitals", "--out", str(out), "--no-progress"]
    log = tmp_path / "log"
    one_line_error(*run_cli(["extract", "--task", "no-such-task", "--out", str(out)], log), "unknown task",
                   "headprobe tasks")
    one_line_error(*run_cli([*base, "--model", str(tmp_path / "no" / "model")], log), "not a model folder")
    one_line_error(*run_cli([*base, "--model", str(tmp_path / "missing.gguf")], log), "does not exist")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    one_line_error(*run_cli([*base, "--model", str(tmp_path / "junk.gguf")], log), "could not read the GGUF file")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    one_line_error(*run_cli([*base, "--model", str(empty)], log), "could not load a model from")
    one_line_error(*run_cli([*base, "--model", str(empty), "--device", "bogus"], log), "unknown device 'bogus'")
    if not torch.cuda.is_available():
        one_line_error(*run_cli([*base, "--model", str(empty), "--device", "cuda"], log), "sees no CUDA GPU",
                       "pass cpu")
    for flag in ("--block-examples", "--max-examples", "--batch-tokens"):  # refused before the model loads
        snake = "--" + flag[2:].replace("-", "_")  # the message names the option's one spelling
        one_line_error(*run_cli([*base, "--model", str(empty), flag, "0"], log), f"{snake} 0", "positive")
    assert not out.exists() and not (tmp_path / "x.h5.partial").exists()

    huge = save_model_folder(tmp_path / "huge", v_scale=1e6)  # z overflows float16
    one_line_error(*run_cli([*base, "--model", huge], log), "non-finite activations", "--store_dtype fp32")
    assert not out.exists() and not (tmp_path / "x.h5.partial").exists()
    code, text = run_cli([*base, "--model", huge, "--store-dtype", "fp32", "--max-examples", "4"], log)
    assert code == 0, text
    with Store(out) as s:
        assert np.isfinite(s.activations()).all() and np.abs(s.activations()).max() > 65504

    before = out.read_bytes()
    one_line_error(*run_cli([*base, "--model", model_folder], log), "exists", "--overwrite")
    assert out.read_bytes() == before
    code, text = run_cli([*base, "--model", model_folder, "--overwrite", *SLOW_ARGS], log)
    assert code == 0, text
    with Store(out) as s:
        assert s.meta.model_id == model_folder and s.meta.has_writes

    proc = cli_process([*base, "--model", model_folder, "--out", str(tmp_path / "y.h5"), *SLOW_ARGS], log)
    while proc.is_alive() and not (tmp_path / "y.h5.partial.json").exists():
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    one_line_error(*run_cli([*base, "--model", model_folder, "--out", str(tmp_path / "y.h5")], log),
                   "interrupted extraction", "--resume")
    with pytest.raises(StoreError, match="incomplete"):
        Store(tmp_path / "y.h5.partial")


def test_ctrl_c_ends_in_one_line_pointing_at_resume(tmp_path, model_folder, monkeypatch, capsys):
    """Ctrl-C (a KeyboardInterrupt at the model's second forward) exits 130 with one line; --resume then finishes."""
    from headprobe.train.cli import main

    real_load = ModelSource.load

    def load_and_interrupt(self, *args, **kwargs):
        loaded, calls = real_load(self, *args, **kwargs), []

        def hook(module, inputs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        loaded.model.base_model.register_forward_pre_hook(hook)
        return loaded

    monkeypatch.setattr(ModelSource, "load", load_and_interrupt)
    argv = ["extract", "--task", "capitals", "--out", str(tmp_path / "z.h5"), "--model", model_folder, *SLOW_ARGS]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()  # after transformers' weight-loading bar
    assert exit_.value.code == 130 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("headprobe: interrupted; finished work is kept") and "--resume" in err[-1]
    assert not (tmp_path / "z.h5").exists() and (tmp_path / "z.h5.partial").exists()
    monkeypatch.setattr(ModelSource, "load", real_load)
    main([*argv, "--resume"])
    with Store(tmp_path / "z.h5") as s:
        assert s.shape[0] > 0


def test_empty_data_is_refused_before_anything_is_written(tmp_path):
    loaded = tiny_loaded("gpt2", bos=None)
    empty_task = Task("empty", "KR", "no examples", ["a"], lambda seed: [])
    with pytest.raises(ExtractError, match="has no examples"):
        extract(loaded, empty_task, tmp_path / "e.h5", progress=False)
    blank = Task("blank", "KR", "an empty text", ["a"], lambda seed: [Example("ok", 0), Example("", 1)])
    with pytest.raises(ExtractError, match="example 1 of task 'blank' is empty"):
        extract(loaded, blank, tmp_path / "e.h5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_user_data_file_errors(tmp_path):
    pytest.importorskip("headprobe.extract.tasks.user", reason="user dataset files come with the tasks issue")
    log = tmp_path / "log"
    for name, content in (("empty.jsonl", ""), ("broken.jsonl", "{not json\n")):
        (tmp_path / name).write_text(content)
        code, text = run_cli(["extract", "--task", str(tmp_path / name), "--out", str(tmp_path / "u.h5")], log)
        one_line_error(code, text, name)
    code, text = run_cli(["extract", "--task", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "u.h5")], log)
    one_line_error(code, text, "missing.jsonl")
    assert not (tmp_path / "u.h5").exists()


def test_hub_id_offline_fails_with_a_clear_message(tmp_path):
    """The console script itself, in a fresh interpreter, with the hub switched off."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADPROBE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "headprobe.train.cli", "extract", "--model", "someone/not-a-real-model",
                          "--task", "capitals", "--out", str(tmp_path / "h.h5")], env=env, capture_output=True,
                         text=True, timeout=300)
    one_line_error(res.returncode, res.stdout + res.stderr, "could not load 'someone/not-a-real-model' (the "
                   "Hugging Face Hub is unreachable and the local cache does not hold it)", "local folder")
    assert not (tmp_path / "h.h5").exists()


def test_a_hub_id_in_the_local_cache_loads_when_the_hub_is_unreachable(tmp_path):
    """No offline switch, but an endpoint that refuses connections: the model comes from the hub cache."""
    from helpers import save_tiny_llama

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "0123abc"
    save_tiny_llama(snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("0123abc")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    code = ("from headprobe.extract.models import hub_reachable, load_model; m = load_model('someone/tiny'); "
            "print(hub_reachable(), m.model_id, m.model.config.num_hidden_layers)")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "someone/tiny", "3"]


def test_model_load_errors_in_process(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("smollm2-135m", dtype="fp8")
