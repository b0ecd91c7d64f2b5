"""User datasets: a JSONL or CSV file, or a Hugging Face dataset, as a probing task.

Columns: ``text`` and ``label`` (required), ``position`` (token index to read; negative counts from the end) and
``group`` (examples of one group never land in two splits; default: every row its own group). Labels that are all
integers >= 0, and labels that are strings, become classes named by their sorted distinct values (labels 1 and 2:
two classes, "1" and "2"); other numbers make a regression task. Every bad row raises ``UserDataError`` naming the
file and line; no row is dropped.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from urllib.parse import parse_qsl

from headprobe import HeadprobeError
from headprobe.extract.tasks.base import STAGES, Example, Task


class UserDataError(HeadprobeError, ValueError):
    """A user dataset is malformed; the message names the file and line and says what to fix."""


def _rows_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserDataError(f"{path}:{n}: not valid JSON ({err.msg}): fix the line or remove it") from None
            if not isinstance(row, dict):
                raise UserDataError(f"{path}:{n}: expected a JSON object like {{\"text\": ..., \"label\": ...}}")
            yield n, row


def _rows_csv(path: Path, needed: tuple[str, str] = ("text", "label")):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        missing = [c for c in needed if c not in reader.fieldnames]
        if missing:
            raise UserDataError(f"{path}:1: the header ({', '.join(reader.fieldnames)}) has no {' or '.join(missing)} "
                                f"column: name the columns {' and '.join(needed)}")
        for row in reader:
            if None in row or None in row.values():
                raise UserDataError(f"{path}:{reader.line_num}: {len(reader.fieldnames)} columns expected "
                                    f"({', '.join(reader.fieldnames)}): fix the number of fields")
            yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items()}


def _as_number(value):
    """A CSV cell as int or float where it is one, else unchanged."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def examples_from_rows(rows, where: str, text: str = "text", label: str = "label", position: str = "position",
                       group: str = "group", class_names: list[str] | None = None
                       ) -> tuple[list[Example], list[str], str, bool]:
    """Examples from (line, row dict) pairs; returns (examples, label names, label kind, has positions).
    ``class_names``: the labels are ids into these (a Hugging Face ClassLabel column)."""
    parsed = []
    for n, row in rows:
        for col in (text, label):
            if row.get(col) is None:
                raise UserDataError(f"{where}:{n}: no {col!r} value: every row needs {text!r} and {label!r}")
        if not isinstance(row[text], str) or not row[text].strip():
            raise UserDataError(f"{where}:{n}: {text!r} must be non-empty text")
        value = _as_number(row[label])
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float, str)) or (isinstance(value, float) and not math.isfinite(value)):
            raise UserDataError(f"{where}:{n}: label {row[label]!r} is not a class name, an integer or a finite "
                                f"number")
        pos = _as_number(row.get(position))
        if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int)):
            raise UserDataError(f"{where}:{n}: position {row[position]!r} is not an integer token index")
        grp = row.get(group)
        parsed.append((n, row[text], value, pos, f"line{n}" if grp is None else str(grp)))
    if not parsed:
        raise UserDataError(f"{where}:1: no rows: the file needs {text!r} and {label!r} on every line")
    first_n, first_value = parsed[0][0], parsed[0][2]
    for n, _, value, _, _ in parsed:
        if isinstance(value, str) != isinstance(first_value, str):
            raise UserDataError(f"{where}:{n}: label {value!r} mixes text and numbers (line {first_n} has "
                                f"{first_value!r}): use one kind of label")
    values = [p[2] for p in parsed]
    if len(set(values)) == 1 and not isinstance(first_value, float):
        raise UserDataError(f"{where}: every row has the label {first_value!r}: a probing task needs two labels or more")
    if class_names is not None:
        for n, _, value, _, _ in parsed:
            if not (isinstance(value, int) and 0 <= value < len(class_names)):
                raise UserDataError(f"{where} {n}: label {value!r} is none of the {len(class_names)} classes (-1 "
                                    f"marks an unlabelled row): filter such rows out, e.g. with a labelled split")
        labels, names, kind = values, list(class_names), "class"
    elif isinstance(first_value, str):
        names, kind = sorted(set(values)), "class"
        labels = [names.index(v) for v in values]
    elif all(isinstance(v, int) or float(v).is_integer() for v in values) and min(values) >= 0:
        ints = sorted({int(v) for v in values})  # 1/2 labels are two classes, not three with an empty 0
        labels, kind, names = [ints.index(int(v)) for v in values], "class", [str(k) for k in ints]
    else:
        labels, names, kind = [float(v) for v in values], [], "regression"
    with_pos = [p[3] is not None for p in parsed]
    if any(with_pos) and not all(with_pos):
        n = parsed[with_pos.index(not with_pos[0])][0]
        raise UserDataError(f"{where}:{n}: some rows give {position!r} and some do not: give it on every row or none")
    examples = [Example(text=t, label=y, position=pos, group=g) for (_, t, _, pos, g), y in zip(parsed, labels)]
    return examples, names, kind, all(with_pos)


def _task(name: str, examples: list[Example], names: list[str], kind: str, has_pos: bool, stage: str,
          description: str) -> Task:
    if stage not in (*STAGES, ""):
        raise UserDataError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)} or leave it empty")
    return Task(name, stage, description, names, lambda seed: list(examples), position_rule="task" if has_pos
                else "last", label_kind=kind, metric="none")


def load_user_task(path: str | Path, stage: str = "", text: str = "text", label: str = "label",
                   position: str = "position", group: str = "group") -> Task:
    """A task from a ``.jsonl`` or ``.csv`` file (columns renamed with ``text=``, ``label=`` ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserDataError(f"dataset file {path} does not exist: check the path")
    if path.suffix not in (".jsonl", ".csv"):
        raise UserDataError(f"{path}: user datasets are .jsonl or .csv files")
    rows = _rows_jsonl(path) if path.suffix == ".jsonl" else _rows_csv(path, (text, label))
    examples, names, kind, has_pos = examples_from_rows(rows, str(path), text, label, position, group)
    return _task(path.stem, examples, names, kind, has_pos, stage, f"user dataset {path}")


def load_hf_task(ref: str) -> Task:
    """A task from a Hugging Face dataset: ``hf:NAME?split=train&config=..&text=..&label=..&group=..&limit=N``."""
    name, _, query = ref.removeprefix("hf:").partition("?")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"split", "config", "text", "label", "position", "group", "limit", "stage"}
    if unknown:
        raise UserDataError(f"{ref}: unknown option(s) {', '.join(sorted(unknown))}: use split, config, text, label, "
                            f"position, group, limit, stage")
    try:
        import datasets
        if not hasattr(datasets, "load_dataset"):  # not the library: a folder of that name (as this repo's)
            raise ImportError
    except ImportError:
        raise UserDataError("Hugging Face datasets need the `datasets` library: run `pip install datasets`, "
                            "or export the data to a .jsonl file") from None
    split = opts.get("split", "train")
    try:
        data = datasets.load_dataset(name, opts.get("config"), split=split)
    except Exception as err:  # the library raises many kinds for a missing or unreachable dataset
        raise UserDataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): "
                            f"{str(err).splitlines()[0][:200]}") from None
    if "limit" in opts:
        data = data.select(range(min(int(opts["limit"]), len(data))))
    cols = {k: opts.get(k, k) for k in ("text", "label", "position", "group")}
    for k in ("text", "label"):
        if cols[k] not in data.column_names:
            raise UserDataError(f"{ref}: no column {cols[k]!r} (columns: {', '.join(data.column_names)}): map it with "
                                f"?{k}=COLUMN")
    rows = ((i + 1, {k: row.get(c) for k, c in cols.items()}) for i, row in enumerate(data))
    feature = data.features.get(cols["label"])
    examples, names, kind, has_pos = examples_from_rows(rows, f"{name}[{split}] row",
                                                        class_names=getattr(feature, "names", None))
    return _task(name.replace("/", "_"), examples, names, kind, has_pos, opts.get("stage", ""),
                 f"Hugging Face dataset {name} ({split})")
