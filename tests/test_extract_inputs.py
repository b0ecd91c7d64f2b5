"""Bad inputs of `headprobe extract` are refused before the model's weights load, or at the latest before its first
forward: inputs longer than the model's context (and what --truncate does instead), user data too small for the
splits, an --out that is a folder or cannot be written, pickled weights, --layers outside the model."""
from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from headprobe.extract import ExtractConfig, ExtractError, ModelLoadError, Store, extract
from headprobe.extract.extractor import check_output, context_limit
from headprobe.extract.models import ModelSource, load_model
from headprobe.extract.tasks import Example, Task, get_task, resolve_task
from headprobe.extract.tasks.user import UserDataError
from headprobe.train.cli import main
from helpers import save_model_folder, tiny_loaded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _never_load(monkeypatch) -> None:
    def fail(self, *args, **kwargs):
        raise AssertionError("the model's weights loaded")
    monkeypatch.setattr(ModelSource, "load", fail)


def _cli_error(argv: list[str], capsys) -> str:
    """Run ``headprobe <argv>`` here; it must exit 2 with one error line, which is returned."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("headprobe: error: ")]
    assert done.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0].removeprefix("headprobe: error: ")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_forward(loaded) -> None:
    def hook(module, args):
        raise AssertionError("the model ran")
    loaded.model.base_model.register_forward_pre_hook(hook)


def test_a_line_longer_than_the_context_is_refused_before_the_weights_load(tmp_path, model_folder, monkeypatch,
                                                                           capsys):
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["a b", "c d", "e f", "x" * 700, "g", "y" * 900])]
    data = _jsonl(tmp_path / "long.jsonl", rows)
    _never_load(monkeypatch)
    line = _cli_error(["extract", "--model", model_folder, "--task", str(data), "--out", str(tmp_path / "x.h5")],
                      capsys)
    assert line == (f"{data}:4: 701 tokens, more than the model's 512 positions (2 inputs are too long): shorten it, "
                    f"or pass --truncate to keep the last 512 tokens")
    loaded = tiny_loaded("gpt2")  # learned positions: 128
    _no_forward(loaded)
    with pytest.raises(ExtractError, match="^" + re.escape(f"{data}:4: 701 tokens, more than the model's 128")):
        extract(loaded, resolve_task(str(data)), tmp_path / "x.h5", progress=False)
    builtin = Task("t", "KR", "", ["a", "b"], lambda seed: [Example("ok", 0), Example("z" * 200, 1)])
    with pytest.raises(ExtractError, match=r"^example 1 of task 't': 201 tokens, more than the model's 128"):
        extract(loaded, builtin, tmp_path / "x.h5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]
    assert context_limit(loaded.model.config) == 128 and context_limit(object()) is None


def _cut(ids: list[int], limit: int) -> list[int]:
    return ids[:1] + ids[len(ids) - limit + 1:]


def test_truncate_keeps_bos_and_the_end_and_moves_positions_with_their_tokens(tmp_path):
    """An input cut by --truncate gives the rows of the same tokens cut by hand: BOS, then the last 127 tokens."""
    rng = np.random.default_rng(0)
    texts = ["short one", "".join(rng.choice(list("abcdefgh"), 300)), "".join(rng.choice(list("xyz "), 200))]
    ids = [[1] + [3 + b for b in t.encode()] for t in texts]  # ByteTokenizer(bos=1)
    long_positions = [-3, -3, 150]  # from the end; from the end; from the start, in the kept part
    by_hand = [Example(token_ids=ids[0], label=0, position=-3),
               Example(token_ids=_cut(ids[1], 128), label=1, position=-3),
               Example(token_ids=_cut(ids[2], 128), label=0, position=150 - (len(ids[2]) - 128))]
    cut = [Example(text=t, label=e.label, position=p) for t, e, p in zip(texts, by_hand, long_positions)]
    loaded = tiny_loaded("gpt2")
    for rule in ("task", "all"):
        stores = [Store(extract(loaded, Task(name, "KR", "", ["a", "b"], lambda seed, ex=ex: ex, position_rule=rule),
                                tmp_path / f"{name}-{rule}.h5", ExtractConfig(truncate=name == "cut"),
                                progress=False)) for name, ex in (("cut", cut), ("hand", by_hand))]
        for column in ("token_id", "position", "example_id", "label"):
            np.testing.assert_array_equal(stores[0].column(column), stores[1].column(column))
        np.testing.assert_array_equal(stores[0].activations(), stores[1].activations())
        assert stores[0].meta.config["truncate"] is True and "truncate" not in stores[1].meta.config
    assert len(stores[0]) == 10 + 128 + 128  # under "all": one row per kept token
    assert stores[0].column("token_id")[10] == 1  # BOS stays at the start of a cut input
    lost = [Example(text=texts[1], label=1, position=5), Example(text="ab", label=0, position=1)]
    with pytest.raises(ExtractError, match=r"^example 0 of task 'lost': position 5 falls in the 173 tokens that "
                                           r"--truncate cuts from the start: give it from the end"):
        extract(loaded, Task("lost", "KR", "", ["a", "b"], lambda seed: lost, position_rule="task"),
                tmp_path / "lost.h5", ExtractConfig(truncate=True), progress=False)


@pytest.mark.parametrize("n_rows, groups, max_examples, says", [
    (2, None, None, "2 examples in 2 groups leave the val and test splits empty: a 60/20/20 train/val/test split "
                    "needs at least 5 groups"),
    (4, None, None, "4 examples in 4 groups leave the test split empty: a 60/20/20"),
    (12, 3, None, "12 examples in 3 groups leave the test split empty"),
    (20, None, 3, "3 examples in 3 groups leave the test split empty (--max_examples 3 keeps 3 of 20): a 60/20/20"),
])
def test_user_data_too_small_for_every_split_is_refused(tmp_path, n_rows, groups, max_examples, says):
    rows = [{"text": f"row {i}", "label": i % 2, **({"group": f"g{i % groups}"} if groups else {})}
            for i in range(n_rows)]
    task = resolve_task(str(_jsonl(tmp_path / "d.jsonl", rows)))
    loaded = tiny_loaded("gpt2")
    _no_forward(loaded)
    with pytest.raises(UserDataError, match="^" + re.escape(f"{tmp_path / 'd.jsonl'}: {says}")):
        extract(loaded, task, tmp_path / "x.h5", ExtractConfig(max_examples=max_examples), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_five_groups_are_enough_and_built_in_samples_stay_allowed(tmp_path):
    task = resolve_task(str(_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(5)])))
    with Store(extract(tiny_loaded("gpt2"), task, tmp_path / "x.h5", progress=False)) as s:
        assert sorted(np.unique(s.column("split")).tolist()) == [0, 1, 2]
    with Store(extract(tiny_loaded("gpt2"), get_task("capitals"), tmp_path / "c.h5", ExtractConfig(max_examples=4),
                       progress=False)) as s:  # a quick look at a built-in task is not refused
        assert len(s) == 4


def test_an_out_folder_is_told_to_name_a_file(tmp_path):
    (tmp_path / "o.h5").mkdir()
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ExtractError, match="^" + re.escape(f"--out {tmp_path / 'o.h5'} is a folder: pass a file "
                                                                  f"path, such as {tmp_path / 'o.h5' / 'store.h5'}")):
            check_output(tmp_path / "o.h5", resume, overwrite)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write to: chmod 0o555 where that stops it, else a read-only tmpfs (root)."""
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        yield folder
        return
    (folder / "probe").unlink()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("this user writes into 0o555 folders and cannot mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_read_only_out_is_refused_before_the_model_loads(read_only_folder, model_folder, monkeypatch, capsys):
    _never_load(monkeypatch)
    out = read_only_folder / "sub" / "x.h5"
    line = _cli_error(["extract", "--model", model_folder, "--task", "capitals", "--out", str(out)], capsys)
    assert line.startswith(f"--out {out}: cannot write in {read_only_folder} (") and line.endswith(
        "): pass a path in a folder you can write to")
    assert "permission denied" in line or "read-only file system" in line


def _pickle_that_runs_code(marker: Path) -> bytes:
    """A pickle whose loading calls os.mkdir(marker)."""
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    return pickle.dumps(Payload())


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path):
    from transformers import LlamaConfig

    armed = tmp_path / "armed"
    pickle.loads(_pickle_that_runs_code(armed))  # the payload does run code when unpickled
    assert armed.is_dir()
    evil, marker = tmp_path / "evil", tmp_path / "pwned"
    LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=64, vocab_size=300).save_pretrained(evil)
    (evil / "pytorch_model.bin").write_bytes(_pickle_that_runs_code(marker))
    with pytest.raises(ModelLoadError, match="^" + re.escape(f"{evil / 'pytorch_model.bin'}: pickled weights, which "
                                                             f"headprobe never loads (a pickle can run code): pass a "
                                                             f"folder with the weights as .safetensors")) as err:
        load_model(str(evil))
    assert "weights_only" not in str(err.value) and not marker.exists()
    both = Path(save_model_folder(tmp_path / "both"))  # safetensors next to a pickle: only the safetensors load
    (both / "pytorch_model.bin").write_bytes(_pickle_that_runs_code(marker))
    assert load_model(str(both)).model.config.num_hidden_layers == 3 and not marker.exists()


def test_layers_outside_the_model_are_refused_before_the_weights_load(tmp_path, model_folder, monkeypatch, capsys):
    _never_load(monkeypatch)
    argv = ["extract", "--model", model_folder, "--task", "capitals", "--out", str(tmp_path / "x.h5")]
    assert _cli_error([*argv, "--layers", "0,3"], capsys) == ("--layers 0,3: this model has layers 0..2: --layers "
                                                              "must lie in 0..2")
    assert _cli_error([*argv, "--device", "tpu9"], capsys).startswith("unknown device 'tpu9'")
    assert list(tmp_path.iterdir()) == []


def test_extraction_code_keeps_functions_short():
    """The project's rule (no function over 60 lines) for the extraction modules this work touched."""
    for rel in ("extract/extractor.py", "extract/store.py", "extract/models.py", "extract/cli.py",
                "extract/tasks/user.py"):
        tree = ast.parse((ROOT / rel).read_text())
        long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
        assert not long, f"{rel}: {', '.join(long)}"
