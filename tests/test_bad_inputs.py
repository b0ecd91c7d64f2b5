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
TRAIN = [
    Bad("train-unknown-kind", ["train", "foo"], r"unknown model 'foo': choose one of linear, sparse, sae"),
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
