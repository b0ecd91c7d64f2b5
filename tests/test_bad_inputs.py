"""Bad input, one table: every row runs a `headprobe` command the way a user (or a hostile file) would and asserts
exit code 2, exactly one line on stderr that names the problem and what to do, and nothing left behind that looks
complete. Commands run in subprocesses forked from a server that imported torch once (tests/helpers.py)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from headprobe.extract.store import write_array_store
from helpers import planted, run_cli_split, save_model_folder


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
    Bad("extract-unknown-device", ["extract", "--task", "capitals", "--out", "{tmp}/x.h5", "--model", "{model}",
                                   "--device", "gpu7"],
        r"unknown device 'gpu7': pass cpu, cuda", leaves=("{tmp}/x.h5",)),
    Bad("extract-layers-outside-the-model", ["extract", "--task", "capitals", "--out", "{tmp}/x.h5", "--model",
                                             "{model}", "--layers", "1,7"],
        r"--layers 1,7: this model has layers 0\.\.2", leaves=("{tmp}/x.h5", "{tmp}/x.h5.partial")),
    Bad("extract-csv-without-text-and-label", ["extract", "--task", "{tmp}/d.csv", "--out", "{tmp}/x.h5", "--model",
                                               "{model}"],
        r"d\.csv:1: the header \(sentence, tag\) has no text or label",
        leaves=("{tmp}/x.h5",), setup=_write("d.csv", "sentence,tag\nhello,1\n")),
    Bad("extract-empty-jsonl", ["extract", "--task", "{tmp}/e.jsonl", "--out", "{tmp}/x.h5", "--model", "{model}"],
        r"e\.jsonl:1: no rows", leaves=("{tmp}/x.h5",), setup=_write("e.jsonl", "")),
    Bad("extract-jsonl-bad-line", ["extract", "--task", "{tmp}/b.jsonl", "--out", "{tmp}/x.h5", "--model", "{model}"],
        r"b\.jsonl:2: not valid JSON", leaves=("{tmp}/x.h5",),
        setup=_write("b.jsonl", '{"text": "ok", "label": 1}\n{"text": "cut\n')),
    Bad("extract-line-longer-than-the-context", ["extract", "--task", "{tmp}/l.jsonl", "--out", "{tmp}/x.h5",
                                                 "--model", "{model}"],
        r"l\.jsonl:4: 701 tokens, more than the model's 512 positions.*--truncate",
        leaves=("{tmp}/x.h5", "{tmp}/x.h5.partial"),
        setup=_write("l.jsonl", "".join(f'{{"text": "{t}", "label": {i % 2}}}\n'
                                        for i, t in enumerate(["a b", "c d", "e f", "x" * 700, "g", "h"])))),
    Bad("extract-position-cut-by-truncate", ["extract", "--task", "{tmp}/p.jsonl", "--out", "{tmp}/x.h5", "--model",
                                             "{model}", "--truncate"],
        r"p\.jsonl:2: position 3 falls in the 189 tokens that --truncate cuts", leaves=("{tmp}/x.h5",),
        setup=_write("p.jsonl", "".join(f'{{"text": "{t}", "label": {i % 2}, "position": 3}}\n'
                                        for i, t in enumerate(["abcd", "y" * 700, "efgh", "ijkl", "mnop", "qrst"])))),
    Bad("extract-non-utf8-file", ["extract", "--task", "{tmp}/n.jsonl", "--out", "{tmp}/x.h5", "--model", "{model}"],
        r"n\.jsonl:2: byte 0xe9 \(column 14\) is not UTF-8 text: save the file as UTF-8", leaves=("{tmp}/x.h5",),
        setup=_write("n.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')),
    Bad("extract-out-is-a-folder", ["extract", "--task", "capitals", "--out", "{tmp}/o.h5", "--model", "{model}",
                                    "--overwrite"], r"--out .*o\.h5 is a folder: pass a file path",
        setup=lambda tmp: (tmp / "o.h5").mkdir()),
    Bad("extract-out-read-only", ["extract", "--task", "capitals", "--out", "{tmp}/ro/x.h5", "--model", "{model}"],
        r"--out .*ro/x\.h5: cannot write in .*ro \(permission denied\)", leaves=("{tmp}/ro/x.h5",),
        setup=lambda tmp: ((tmp / "ro").mkdir(mode=0o555), os.access(tmp / "ro", os.W_OK) and pytest.skip(
            "this user (root) writes into a 0o555 folder anyway: test_extract_inputs checks a read-only mount"))),
    Bad("extract-pickled-weights", ["extract", "--task", "capitals", "--out", "{tmp}/x.h5", "--model", "{tmp}/evil"],
        r"evil/pytorch_model\.bin: pickled weights, which headprobe never loads", leaves=("{tmp}/pwned", "{tmp}/x.h5"),
        setup=lambda tmp: (_write("evil/config.json", '{"model_type": "llama", "hidden_size": 48, "vocab_size": 300, '
                                  '"num_hidden_layers": 3, "num_attention_heads": 6, "intermediate_size": 64}')(tmp),
                           _write("evil/pytorch_model.bin", f"cos\nmkdir\n(V{tmp}/pwned\ntR.")(tmp))),
    Bad("extract-two-rows-leave-val-and-test-empty", ["extract", "--task", "{tmp}/t.jsonl", "--out", "{tmp}/x.h5",
                                                      "--model", "{model}"],
        r"t\.jsonl: 2 examples in 2 groups leave the val and test splits empty: a 60/20/20 .* at least 5 groups",
        leaves=("{tmp}/x.h5", "{tmp}/x.h5.partial"),
        setup=_write("t.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')),
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
SAE = ["train", "sae", "--data.path", "{store}", "--out", "{tmp}/run", "--logger", "none"]
TRAIN = [
    Bad("train-unknown-kind", ["train", "foo"], r"unknown model 'foo': choose one of linear, sparse, sae"),
    # linear / sparse probe settings
    Bad("train-linear-unknown-control", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/run",
                                         "--model.controls", "[nosuch]"],
        r"--model.controls: unknown control 'nosuch': choose from control, shuffled", leaves=("{tmp}/run/checkpoint",)),
    Bad("train-linear-unknown-scope", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/run",
                                       "--model.scope", "xyz"],
        r"--model.scope 'xyz': choose head or layer", leaves=("{tmp}/run/checkpoint",)),
    Bad("train-linear-unknown-control-by", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/run",
                                            "--model.control_by", "nosuchcolumn"],
        r"--model.control_by 'nosuchcolumn': choose one of token_id, group, example_id",
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-linear-unknown-loss", ["train", "linear", "--data.path", "{store}", "--out", "{tmp}/run",
                                      "--model.loss", "xyz"],
        r"--model.loss 'xyz': choose one of auto, logistic, softmax, ridge", leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sparse-unknown-penalty", ["train", "sparse", "--data.path", "{store}", "--out", "{tmp}/run",
                                         "--model.penalty", "xyz"],
        r"--model.penalty 'xyz': choose one of l1, elastic_net, group_lasso", leaves=("{tmp}/run/checkpoint",)),
    # trainer, data, store, output and resume settings
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
    # sparse autoencoder settings
    Bad("train-sae-k-above-d-sae", [*SAE, "--model.init_args.d_sae", "16", "--model.init_args.k", "32"],
        r"--model.k 32 is more than the SAE's --model.d_sae 16: pass a smaller k or a larger d_sae",
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sae-k-zero", [*SAE, "--model.init_args.k", "0"], r"--model.k 0: pass a positive number of active",
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sae-unknown-architecture", [*SAE, "--model.init_args.architecture", "gated"],
        r"unknown SAE architecture 'gated': choose one of relu, topk, batchtopk, jumprelu",
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sae-negative-l1-coeff", [*SAE, "--model.init_args.architecture", "relu",
                                        "--model.init_args.l1_coeff", "-0.5"],
        r"--model.l1_coeff -0.5: pass a coefficient >= 0", leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sae-no-latents", [*SAE, "--model.init_args.expansion", "0"],
        r"--model.d_sae 0 with --model.expansion 0 gives the SAE no latents: pass a positive d_sae or expansion",
        leaves=("{tmp}/run/checkpoint",)),
    Bad("train-sae-momentum-one", [*SAE, "--model.init_args.batchtopk_momentum", "1"],
        r"--model.batchtopk_momentum 1(\.0)?: pass a momentum in \[0, 1\)", leaves=("{tmp}/run/checkpoint",)),
]

# --- headprobe attribute ---------------------------------------------------------------------------------------
def _store_of_another_model(tmp: Path) -> None:
    """{tmp}/other.h5: a labelled store whose model (weights hash) is not the checkpoints'."""
    import h5py

    z, y, split = planted(n=60)
    write_array_store(tmp / "other.h5", z, y, split)
    with h5py.File(tmp / "other.h5", "r+") as f:
        f.attrs["weights_hash"] = "f" * 16
        f.attrs["model_id"] = "another-model"


ATTRIBUTE = [
    Bad("attribute-no-checkpoint", ["attribute", "{tmp}", "--out", "{tmp}/attr"], r"no checkpoint found",
        leaves=("{tmp}/attr/report.md",)),
    Bad("attribute-missing-path", ["attribute", "{tmp}/missing", "--out", "{tmp}/attr"],
        r"missing does not exist: pass checkpoint folders or a run folder", leaves=("{tmp}/attr",)),
    Bad("attribute-out-is-a-file", ["attribute", "{ckpt}", "--out", "{tmp}/taken"], r"--out .*taken is a file: pass a "
        r"folder", setup=_write("taken", "mine")),
    Bad("attribute-level-outside-0-1", ["attribute", "{ckpt}", "--out", "{tmp}/attr", "--alpha", "2"],
        r"'2': a level between 0 and 1", leaves=("{tmp}/attr",)),
    Bad("attribute-one-random-draw", ["attribute", "{ckpt}", "--out", "{tmp}/attr", "--ablate", "2", "--draws", "1"],
        r"'1': the prediction interval needs at least 2 random draws", leaves=("{tmp}/attr",)),
    Bad("attribute-store-of-another-model", ["attribute", "{ckpt}", "--stores", "{tmp}/other.h5", "--out",
                                             "{tmp}/attr"],
        r"other.h5 was extracted from another-model .*pass stores extracted from the checkpoints' model",
        setup=_store_of_another_model, leaves=("{tmp}/attr/report.md",)),
    Bad("attribute-earlier-attribution", ["attribute", "{ckpt}", "--out", "{tmp}/attr"],
        r"--out .*attr holds an attribution \(report.md\): pass --overwrite", setup=_write("attr/report.md", "old")),
    Bad("attribute-checks-on-another-model", ["attribute", "{ckpt}", "--out", "{tmp}/attr", "--head_scores",
                                              "--model", "{model}"],
        r"is not the model the checkpoints were trained on: pass that model with --model",
        leaves=("{tmp}/attr/report.md",)),
]

# --- headprobe hub ---------------------------------------------------------------------------------------------
def _hub_registry(more: str, digest: str = "0" * 64) -> Callable[[Path], None]:
    """{tmp}/hub/registry.json holding one entry v0/x, with ``more`` JSON fields and this model digest."""
    return _write("hub/registry.json", '{"version": 1, "checkpoints": {"v0/x": {"location": "v0/x", "sha256": '
                  '{"model.safetensors": "' + digest + '", "config.json": "' + "1" * 64 + '"}' + more + '}}}')


def _checkpoint_folder(config: str) -> Callable[[Path], None]:
    """{tmp}/ck with 64 zero bytes as model.safetensors and ``config`` as config.json."""
    return lambda tmp: (_write("ck/model.safetensors", bytes(64))(tmp), _write("ck/config.json", config)(tmp))


HUB = [
    Bad("hub-traversal-id", ["hub", "show", "v1/../../etc"], r"invalid checkpoint id"),
    Bad("hub-list-missing-hub", ["hub", "list", "--hub", "{tmp}/nothing"],
        r"no registry at .*nothing/registry\.json: pass a hub folder", leaves=("{tmp}/nothing",)),
    Bad("hub-show-unknown-id", ["hub", "show", "v0/missing", "--hub", "{tmp}/hub"],
        r"'v0/missing' is not in the registry at .*hub \(known: none\): run `headprobe hub list`",
        setup=_write("hub/registry.json", '{"version": 1, "checkpoints": {}}')),
    Bad("hub-push-not-a-checkpoint", ["hub", "push", "{tmp}/notes", "--to", "{tmp}/hub", "--id", "v0/x"],
        r"notes is not a headprobe checkpoint \(model\.safetensors is missing\)",
        leaves=("{tmp}/hub",), setup=_write("notes/README.md", "# not a checkpoint\n")),
    Bad("hub-push-to-a-file", ["hub", "push", "{ckpt}", "--to", "{tmp}/hubfile", "--id", "v0/x"],
        r"hubfile is a file, not a hub folder: pass a folder", setup=_write("hubfile", "mine\n")),
    Bad("hub-push-existing-id", ["hub", "push", "{ckpt}", "--to", "{tmp}/hub", "--id", "v0/x"],
        r"hub already holds v0/x: pass --overwrite to replace it", leaves=("{tmp}/hub/v0/x",),
        setup=_hub_registry("")),
    Bad("hub-show-garbage-config", ["hub", "show", "{tmp}/ck"], r"ck/config\.json is not a valid checkpoint config",
        setup=_checkpoint_folder("{not json")),
    Bad("hub-show-tampered-tensors", ["hub", "show", "{tmp}/ck"],
        r"ck/model\.safetensors does not match its recorded sha256 .*fetch it again",
        setup=_checkpoint_folder('{"cls": "LinearProbes", "hparams": {}, "model_id": "m", "weights_hash": "w", '
                                 '"architecture": "a", "hook_point": "h", "layers": [0], "n_heads": 1, "d_head": 1, '
                                 '"tensors_sha256": "' + "0" * 64 + '"}')),
    Bad("hub-list-registry-not-an-object", ["hub", "list", "--hub", "{tmp}/hub"],
        r"registry\.json is not a valid headprobe registry \(want an object", setup=_write("hub/registry.json", "[1]")),
    Bad("hub-list-metrics-not-numbers", ["hub", "list", "--hub", "{tmp}/hub"],
        r"entry 'v0/x' has unsafe metrics .*the registry is corrupt or hostile",
        setup=_hub_registry(', "metrics": {"val/acc": "high"}')),
    Bad("hub-list-absolute-digest", ["hub", "list", "--hub", "{tmp}/hub"],
        r"entry 'v0/x' has an unsafe sha256 for model\.safetensors: '/etc/.*want 64 lowercase hex digits",
        setup=_hub_registry("", digest="/etc/cron.d/" + "x" * 52)),
    Bad("hub-list-terminal-escape", ["hub", "list", "--hub", "{tmp}/hub"],
        r"entry 'v0/x' has an unsafe task '.*\\x1b.*control characters",
        setup=_hub_registry(', "task": "\\u001b[2Jcapitals"')),
]

# --- headprobe run ---------------------------------------------------------------------------------------------
RUN = [
    Bad("run-max-examples-zero", ["run", "--max_examples", "0", "--out", "{tmp}/run"],
        r"--max_examples 0: pass a positive number", leaves=("{tmp}/run",)),
    Bad("run-unknown-task", ["run", "--tasks", "[nope]", "--out", "{tmp}/run"],
        r"unknown task 'nope': run `headprobe tasks` to list them", leaves=("{tmp}/run",)),
    Bad("run-task-without-stage", ["run", "--tasks", "[corpus]", "--out", "{tmp}/run"],
        r"corpus: pick tasks with a stage", leaves=("{tmp}/run",)),
    Bad("run-one-random-draw", ["run", "--attribution.draws", "1", "--out", "{tmp}/run"],
        r"--draws 1: the ablation check needs at least 2 random draws", leaves=("{tmp}/run",)),
    Bad("run-unknown-logger", ["run", "--logger", "xyz", "--out", "{tmp}/run"],
        r"--logger: Expected one of 'wandb', 'csv', 'none'", leaves=("{tmp}/run",)),
    Bad("run-unknown-option", ["run", "--nosuch", "3", "--out", "{tmp}/run"], r"nosuch", leaves=("{tmp}/run",)),
    Bad("run-sae-layer-outside-the-model", ["run", "--model", "{model}", "--tasks", "[ioi]", "--max_examples", "20",
                                            "--sae.layer", "99", "--logger", "none", "--out", "{tmp}/run"],
        r"--sae.layer 99: .* has layers 0..2", leaves=("{tmp}/run/report",)),
]

TABLE = GENERAL + EXTRACT + TRAIN + ATTRIBUTE + HUB + RUN


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    """A tiny model folder, a labelled store and a trained linear checkpoint, built once for every row."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = save_model_folder(root / "model")
    z, y, split = planted(n=300)
    store = write_array_store(root / "store.h5", z, y, split, label_names=["no", "yes"])
    from headprobe.train.train_cli import expand_short_form, run

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
