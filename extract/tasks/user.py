"""User datasets: a JSONL or CSV file, or a Hugging Face dataset, as a probing task.

Columns: ``text`` and ``label`` (required), ``position`` (token index to read; negative counts from the end) and
``group`` (examples of one group never land in two splits; default: every row its own group). Labels that are all
integers >= 0, and labels that are strings, become classes named by their sorted distinct values (labels 1 and 2:
two classes, "1" and "2"); other numbers make a regression task. Every bad row raises ``UserDataError`` naming the
file and line; no row is dropped. The task's ``extra`` keeps the source (``source``) and each text's line
(``lines``), so that later checks (an input longer than the model's context, too few groups for the splits) can
name them too.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from headprobe import HeadprobeError
from headprobe.extract.tasks.base import STAGES, Example, Task, assign_splits

SPLIT_NAMES = ("train", "val", "test")


class UserDataError(HeadprobeError, ValueError):
    """A user dataset is malformed; the message names the file and line and says what to fix."""


def _read_text(path: Path) -> str:
    """The file as text; a byte sequence that is not UTF-8 is refused with its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not part of the header
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserDataError(f"{path}:{line}: byte 0x{data[err.start]:02x} (column {column}) is not UTF-8 text: save "
                            f"the file as UTF-8") from None


def _rows_jsonl(path: Path):
    for n, line in enumerate(_read_text(path).split("\n"), 1):
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
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
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
                       ) -> tuple[list[Example], list[str], str, bool, list[int]]:
    """Examples from (line, row dict) pairs; returns (examples, label names, label kind, has positions, each
    example's line). ``class_names``: the labels are ids into these (a Hugging Face ClassLabel column)."""
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
    return examples, names, kind, all(with_pos), [p[0] for p in parsed]


def _task(name: str, parsed: tuple, stage: str, description: str, source: str, at: str = "{source}:{line}") -> Task:
    """A task from :func:`examples_from_rows`' result; ``source`` names the data in messages, ``at`` one line."""
    examples, names, kind, has_pos, lines = parsed
    if stage not in (*STAGES, ""):
        raise UserDataError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)} or leave it empty")
    where = {}
    for ex, n in zip(examples, lines):
        where.setdefault(ex.text, n)  # a repeated text is named by its first line
    return Task(name, stage, description, names, lambda seed: list(examples), position_rule="task" if has_pos
                else "last", label_kind=kind, metric="none", extra={"source": source, "lines": where, "at": at})


def where_is(task: Task, example: Example) -> str | None:
    """``file:line`` of a user dataset's example, or None for a task that is not read from a file."""
    source, lines = task.extra.get("source"), task.extra.get("lines") or {}
    if source is None or example.text not in lines:
        return None
    return task.extra["at"].format(source=source, line=lines[example.text])


def require_every_split(task: Task, keys: list[str], splits: np.ndarray, note: str = "") -> None:
    """Refuse a user dataset whose examples (grouped by ``keys``, split into ``splits``) leave a split empty."""
    names = [name for s, name in enumerate(SPLIT_NAMES) if task.split_fractions[s] > 0 and not (splits == s).any()]
    if not names or task.extra.get("source") is None:
        return
    fractions = np.asarray(task.split_fractions, dtype=float) / sum(task.split_fractions)
    need = next((n for n in range(1, 10_000) if _fills_every_split(n, task.split_fractions)), "more")
    raise UserDataError(f"{task.extra['source']}: {len(keys)} examples in {len(set(keys))} groups leave the "
                        f"{' and '.join(names)} split{'s' if len(names) > 1 else ''} empty{note}: a "
                        f"{'/'.join(f'{100 * f:.0f}' for f in fractions)} train/val/test split needs at least {need} "
                        f"groups (a row without a group is a group of its own): add rows")


def _fills_every_split(n_groups: int, fractions: tuple[float, float, float]) -> bool:
    splits = assign_splits([str(i) for i in range(n_groups)], fractions)
    return all((splits == s).any() for s in range(3) if fractions[s] > 0)


def load_user_task(path: str | Path, stage: str = "", text: str = "text", label: str = "label",
                   position: str = "position", group: str = "group") -> Task:
    """A task from a ``.jsonl`` or ``.csv`` file (columns renamed with ``text=``, ``label=`` ...)."""
    path = Path(path)
    if not path.is_file():
        raise UserDataError(f"dataset file {path} does not exist: check the path")
    if path.suffix not in (".jsonl", ".csv"):
        raise UserDataError(f"{path}: user datasets are .jsonl or .csv files")
    rows = list(_rows_jsonl(path) if path.suffix == ".jsonl" else _rows_csv(path, (text, label)))
    parsed = examples_from_rows(rows, str(path), text, label, position, group)
    return _task(path.stem, parsed, stage or _stage_column(rows, str(path)), f"user dataset {path}", str(path))


def _stage_column(rows: list[tuple[int, dict]], where: str) -> str:
    """The task's stage from a ``stage`` column (one value for every row), or "" without one."""
    values = {(n, str(row["stage"]).strip()) for n, row in rows if row.get("stage") not in (None, "")}
    stages = {v for _, v in values}
    if len(stages) > 1:
        line = min(n for n, v in values if v != min(stages))
        raise UserDataError(f"{where}:{line}: the stage column holds {', '.join(sorted(stages))}: a task has one "
                            f"stage (one of {', '.join(STAGES)}); split the file by stage")
    return stages.pop() if stages else ""


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
    parsed = examples_from_rows(rows, f"{name}[{split}] row", class_names=getattr(feature, "names", None))
    return _task(name.replace("/", "_"), parsed, opts.get("stage", ""), f"Hugging Face dataset {name} ({split})",
                 f"{name}[{split}]", at="{source} row {line}")
