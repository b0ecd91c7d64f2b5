"""User datasets (JSONL / CSV / Hugging Face): parsing, label names, extraction, and errors naming file and line."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from headprobe.extract.extractor import extract
from headprobe.extract.store import Store
from headprobe.extract.tasks import resolve_task
from headprobe.extract.tasks.user import UserDataError
from helpers import tiny_loaded


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_with_string_labels_positions_and_groups_extracts(tmp_path):
    rows = [{"text": f"sample number {i} here", "label": ["cat", "ant", "bee"][i % 3], "position": -2,
             "group": f"g{i // 2}"} for i in range(12)]
    task = resolve_task(str(_jsonl(tmp_path / "animals.jsonl", rows)))
    assert (task.name, task.label_names, task.label_kind, task.position_rule) == ("animals", ["ant", "bee", "cat"],
                                                                                  "class", "task")
    store = Store(extract(tiny_loaded("gpt2"), task, tmp_path / "a.h5", progress=False))
    assert store.labels.tolist() == [["ant", "bee", "cat"].index(r["label"]) for r in rows]
    lengths = np.array([len(r["text"].encode()) + 1 for r in rows])  # byte tokenizer + BOS
    assert (store.column("position") == lengths - 2).all()
    split, group = store.column("split"), store.column("group")
    assert all(len(set(split[group == g])) == 1 for g in set(group.tolist()))


def test_csv_integer_and_regression_labels(tmp_path):
    (tmp_path / "ints.csv").write_text("text,label\nfirst one,0\nsecond one,2\n\"a, quoted\nline\",1\n")
    task = resolve_task(str(tmp_path / "ints.csv"))
    assert task.label_names == ["0", "1", "2"] and [e.label for e in task.examples(0)] == [0, 2, 1]
    assert task.examples(0)[2].text == "a, quoted\nline" and task.position_rule == "last"
    (tmp_path / "ratings.csv").write_text("text,label\ngood,2\nbad,1\nfine,10\n")  # classes 1, 2, 10: no empty ones
    ratings = resolve_task(str(tmp_path / "ratings.csv"))
    assert ratings.label_names == ["1", "2", "10"] and [e.label for e in ratings.examples(0)] == [1, 0, 2]
    (tmp_path / "reg.csv").write_text("label,text\n0.5,a\n-1.25,b\n")
    reg = resolve_task(str(tmp_path / "reg.csv"))
    assert reg.label_kind == "regression" and [e.label for e in reg.examples(0)] == [0.5, -1.25]


@pytest.mark.parametrize("lines, line, match", [
    (['{"text": "ok", "label": 1}', '{"text": "broken", "label": }'], 2, "not valid JSON"),
    (['{"text": "ok", "label": 1}', '', '{"text": "no label"}'], 3, "no 'label' value"),
    (['{"label": 1}'], 1, "no 'text' value"),
    (['{"text": "ok", "label": 1}', '{"text": "ok", "label": [1, 2]}'], 2, "not a class name"),
    (['{"text": "ok", "label": 1}', '{"text": "ok", "label": "yes"}'], 2, "mixes text and numbers"),
    (['{"text": "a", "label": 1, "position": 0}', '{"text": "b", "label": 0}'], 2, "some rows give 'position'"),
    (['{"text": "a", "label": 1, "position": "last"}'], 1, "not an integer token index"),
    (['{"text": "", "label": 1}'], 1, "non-empty text"),
    (['["text", "label"]'], 1, "expected a JSON object"),
    ([], 1, "no rows"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, lines, line, match):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserDataError, match=match) as err:
        resolve_task(str(path))
    assert str(err.value).startswith(f"{path}:{line}:")


@pytest.mark.parametrize("content, line, match", [
    ("text,label\na,1\nb\n", 3, "columns expected"),
    ("text,label\na,1\nb,1,extra\n", 3, "columns expected"),
    ("text,category\na,1\n", 1, "header \\(text, category\\) has no label column"),
    ("text,label\na,1\nb,\n", 3, "no 'label' value"),
    ("", 1, "no rows"),
    ("text,label\n", 1, "no rows"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, content, line, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserDataError, match=match) as err:
        resolve_task(str(path))
    assert str(err.value).startswith(f"{path}:{line}:")


def test_one_label_only_is_refused(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\na,pos\nb,pos\n")
    with pytest.raises(UserDataError, match="every row has the label 'pos': a probing task needs two labels"):
        resolve_task(str(tmp_path / "one.csv"))


class FakeHFDataset(list):
    """What ``load_hf_task`` uses of a ``datasets.Dataset``: rows, column names, features, select."""

    def __init__(self, rows: list[dict], label_names: list[str]):
        super().__init__(rows)
        self.column_names = list(rows[0])
        self.features = {"label": types.SimpleNamespace(names=label_names)}

    def select(self, idx):
        return FakeHFDataset([self[i] for i in idx], self.features["label"].names)


def test_hf_class_label_ids_keep_their_names_and_unlabelled_rows_are_refused(monkeypatch):
    names = ["neg", "neutral", "pos"]
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([0, 2, 2, 0])]  # no "neutral" in this subset
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: FakeHFDataset(rows, names))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = resolve_task("hf:someone/reviews")
    assert task.label_names == names and [e.label for e in task.examples(0)] == [0, 2, 2, 0]
    rows[1]["label"] = -1
    with pytest.raises(UserDataError, match="someone/reviews.train. row 2: label -1 is none of the 3 classes"):
        resolve_task("hf:someone/reviews")


def test_missing_file_and_hf_without_datasets(tmp_path, monkeypatch):
    with pytest.raises(UserDataError, match="does not exist"):
        resolve_task(str(tmp_path / "nope.jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the library were not installed
    with pytest.raises(UserDataError, match="pip install datasets"):
        resolve_task("hf:stanfordnlp/imdb?text=text&label=label")
    with pytest.raises(UserDataError, match="unknown option"):
        resolve_task("hf:stanfordnlp/imdb?colour=red")
    monkeypatch.setitem(sys.modules, "datasets", types.ModuleType("datasets"))  # a data folder found by that name
    with pytest.raises(UserDataError, match="pip install datasets"):
        resolve_task("hf:stanfordnlp/imdb?text=text&label=label")


@pytest.mark.parametrize("name, data, line, column, byte", [
    ("latin1.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', 2, 14, "0xe9"),
    ("latin1.csv", b"text,label\nfine,1\nna\xefve,0\n", 3, 3, "0xef"),
    ("first.jsonl", b'\xff{"text": "ok", "label": 1}\n', 1, 1, "0xff"),
])
def test_a_file_that_is_not_utf8_names_file_line_and_byte(tmp_path, name, data, line, column, byte):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserDataError) as err:
        resolve_task(str(path))
    assert str(err.value) == f"{path}:{line}: byte {byte} (column {column}) is not UTF-8 text: save the file as UTF-8"


def test_a_utf8_byte_order_mark_is_not_part_of_the_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\ncafé,1\nthé,0\n".encode("utf-8"))
    task = resolve_task(str(path))
    assert [e.text for e in task.examples(0)] == ["café", "thé"]


def test_user_tasks_remember_where_each_text_is(tmp_path):
    from headprobe.extract.tasks.user import where_is

    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, "", {"text": "b", "label": 1},
                                         {"text": "a", "label": 1}])
    task = resolve_task(str(path))
    assert [where_is(task, e) for e in task.examples(0)] == [f"{path}:1", f"{path}:3", f"{path}:1"]
