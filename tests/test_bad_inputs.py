"""Bad input, one table: every row runs a `headprobe` command the way a user (or a hostile file) would and asserts
exit code 2, exactly one line on stderr that names the problem and what to do, and nothing left behind that looks
complete. Commands run in subprocesses forked from a server that imported torch once (tests/helpers.py)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from helpers import planted, run_cli_split, save_model_folder
from headprobe.extract.store import write_array_store


@dataclass
class Bad:
    """One bad input. In ``argv``, ``leaves`` and ``env`` values: ``{tmp}`` is the row's own empty folder,
    ``{model}`` a tiny model folder, ``{store}`` a labelled store, ``{ckpt}`` a trained linear checkpoint."""

    id: str
    argv: list[str]
    says: str  # a regex the one line must match: the problem and what to do
    leaves: tuple[str, ...] = ()  # paths that must not exist afterwards (finished outputs)
    setup: Callable[[Path], None] | None = None  # writes the bad files into {tmp} first
    env: dict[str, str] = field(default_factory=dict)


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


# --- the command line in general ------------------------------------------------------------------------------
GENERAL = [
    Bad("hub-show-missing-folder", ["hub", "show", "{tmp}/nothing"], r"nothing does not exist: pass a checkpoint folder"),
]

# --- headprobe extract -----------------------------------------------------------------------------------------
EXTRACT = [
    Bad("extract-unknown-task", ["extract", "--task", "no-such-task", "--out", "{tmp}/x.h5", "--model", "{model}"],
        r"unknown task 'no-such-task'.*headprobe tasks", leaves=("{tmp}/x.h5", "{tmp}/x.h5.partial")),
]

# --- headprobe train -------------------------------------------------------------------------------------------
class _Hostile:
    """Unpickled, it makes the folder ``marker``: loading a checkpoint must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _hostile_last_ckpt(zipped: bool) -> Callable[[Path], None]:
    """``{tmp}/run/checkpoints/last.ckpt`` as a hostile pickle (torch's zip format, or a bare pickle) that would make
    ``{tmp}/pwned``."""
    def setup(tmp: Path) -> None:
        import pickle

        import torch

        path = tmp / "run" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        state = {"state_dict": _Hostile(tmp / "pwned"), "pytorch-lightning_version": "2.6.6"}
        torch.save(state, path) if zipped else path.write_bytes(pickle.dumps(state, protocol=4))
    return setup


def _unlabelled_store(tmp: Path) -> None:
    z, _, split = planted(n=200)
    write_array_store(tmp / "unlabelled.h5", z, None, split, label_kind="none")


_RUN = ["--out", "{tmp}/run", "--logger", "none"]
TRAIN = [
    Bad("train-unknown-kind", ["train", "foo"], r"unknown model 'foo': choose one of linear, sparse, sae"),
    Bad("train-max-epochs-negative", ["train", "linear", "--data.path", "{store}", *_RUN, "--trainer.max_epochs", "-5"],
        r"--trainer.max_epochs -5: pass 1 or more, or -1 for no limit", leaves=("{tmp}/run",)),
    Bad("train-max-steps-zero", ["train", "linear", "--data.path", "{store}", *_RUN, "--trainer.max_steps", "0"],
        r"--trainer.max_steps 0 trains nothing: pass 1 or more", leaves=("{tmp}/run",)),
    Bad("train-batch-size-negative", ["train", "linear", "--data.path", "{store}", *_RUN, "--data.batch_size", "-5"],
        r"--data.batch_size -5: pass 0 or more \(rows per batch, or 0 for the whole split", leaves=("{tmp}/run",)),
    Bad("train-num-workers-negative", ["train", "linear", "--data.path", "{store}", *_RUN, "--data.num_workers", "-1"],
        r"--data.num_workers -1: pass 0 or more", leaves=("{tmp}/run",)),
    Bad("train-layers-outside-the-store", ["train", "linear", "--data.path", "{store}", *_RUN, "--data.layers", "[7]"],
        r"--data.layers \[7\]: pick from 0..2", leaves=("{tmp}/run",)),
    Bad("train-store-missing", ["train", "linear", "--data.path", "{tmp}/none.h5", *_RUN],
        r"--data.path .*none.h5 does not exist: pass a store written by `headprobe extract`", leaves=("{tmp}/run",)),
    Bad("train-store-a-folder", ["train", "linear", "--data.path", "{tmp}", *_RUN],
        r"--data.path .* is a folder: pass the .h5 store file", leaves=("{tmp}/run",)),
    Bad("train-store-not-hdf5", ["train", "linear", "--data.path", "{tmp}/fake.h5", *_RUN],
        r"--data.path: .*fake.h5 is not a readable HDF5 file.*extract it again", setup=_write("fake.h5", "no hdf5"),
        leaves=("{tmp}/run",)),
    Bad("train-unlabelled-store-for-a-probe", ["train", "linear", "--data.path", "{tmp}/unlabelled.h5", *_RUN],
        r"no labels.*train an SAE on it", setup=_unlabelled_store, leaves=("{tmp}/run/checkpoint",)),
    Bad("train-out-is-a-file", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/taken",
                                "--logger", "none"],
        r"--out .*taken is a file: pass a folder", setup=_write("taken", "mine")),
    Bad("train-out-under-a-file", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/taken/run",
                                   "--logger", "none"],
        r"--out .*taken/run: .*taken is a file, so the folder cannot be made", setup=_write("taken", "mine")),
    Bad("train-config-missing", ["train", "--config", "{tmp}/none.yaml", "--data.path", "{store}", *_RUN],
        r"--config .*none.yaml does not exist: pass a YAML file", leaves=("{tmp}/run",)),
    Bad("train-config-not-yaml", ["train", "--config", "{tmp}/bad.yaml", "--data.path", "{store}", *_RUN],
        r"--config .*bad.yaml is not valid YAML at line 2: fix the file", setup=_write("bad.yaml", "model: [x\n"),
        leaves=("{tmp}/run",)),
    Bad("train-config-no-mapping", ["train", "--config", "{tmp}/list.yaml", "--data.path", "{store}", *_RUN],
        r"--config .*list.yaml holds no settings", setup=_write("list.yaml", "- model\n- data\n"),
        leaves=("{tmp}/run",)),
    Bad("train-resume-damaged-last-ckpt", ["train", "linear", "--data.path", "{store}", *_RUN, "--resume", "true"],
        r"--resume: .*last.ckpt is damaged.*--overwrite true",
        setup=_write("run/checkpoints/last.ckpt", b"PK\x03\x04junk"),
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-resume-hostile-last-ckpt", ["train", "linear", "--data.path", "{store}", *_RUN, "--resume", "true"],
        r"--resume: .*last.ckpt holds objects other than tensors and plain values", setup=_hostile_last_ckpt(True),
        leaves=("{tmp}/pwned", "{tmp}/run/checkpoint")),
    Bad("train-resume-hostile-bare-pickle", ["train", "linear", "--data.path", "{store}", *_RUN, "--resume", "true"],
        r"--resume: .*last.ckpt holds objects other than tensors and plain values", setup=_hostile_last_ckpt(False),
        leaves=("{tmp}/pwned", "{tmp}/run/checkpoint")),
]

# --- headprobe attribute ---------------------------------------------------------------------------------------
ATTRIBUTE = [
    Bad("attribute-no-checkpoint", ["attribute", "{tmp}", "--out", "{tmp}/attr"], r"no checkpoint found",
        leaves=("{tmp}/attr/report.md",)),
]

# --- headprobe hub ---------------------------------------------------------------------------------------------
HUB = [
    Bad("hub-traversal-id", ["hub", "show", "v1/../../etc"], r"invalid checkpoint id"),
]

# --- headprobe run ---------------------------------------------------------------------------------------------
RUN = [
    Bad("run-max-examples-zero", ["run", "--max_examples", "0", "--out", "{tmp}/run"],
        r"--max_examples 0: pass a positive number", leaves=("{tmp}/run",)),
]

TABLE = GENERAL + EXTRACT + TRAIN + ATTRIBUTE + HUB + RUN


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """A tiny model folder, a labelled store and a trained linear checkpoint, built once for every row."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_model_folder(root / "model")
    z, y, split = planted(n=300)
    store = write_array_store(root / "store.h5", z, y, split, label_names=["no", "yes"])
    from headprobe.train.fit import expand_short_form, run

    run(expand_short_form(["linear", "--data.path", str(store), "--out", str(root / "linear"), "--logger", "none",
                           "--trainer.enable_progress_bar", "false"]))
    return {"model": model, "store": str(store), "ckpt": str(root / "linear" / "checkpoint")}


def test_the_table_covers_every_command():
    ids = [row.id for row in TABLE]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    assert {row.argv[0] for row in TABLE} >= {"extract", "train", "attribute", "hub", "run"}


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.id)
def test_bad_input_gives_one_line_exit_2_and_leaves_nothing_complete(row: Bad, fixtures, tmp_path):
    fill = lambda text: text.format(tmp=tmp_path, **fixtures)
    if row.setup:
        row.setup(tmp_path)
    env = {"HEADPROBE_DEBUG": "", **{k: fill(v) for k, v in row.env.items()}}
    code, out, err = run_cli_split([fill(a) for a in row.argv], tmp_path / "out.log", env=env)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(row.says, lines[0]), lines[0]
    assert "weights_only=False" not in err  # never torch's advice to unpickle
    for path in map(Path, map(fill, row.leaves)):
        assert not path.exists(), f"{path} was left behind"
    assert not [p for p in tmp_path.rglob("*.h5") if not p.name.endswith(".partial") and p.stat().st_size == 0]
