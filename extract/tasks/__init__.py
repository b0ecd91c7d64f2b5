"""The task registry: built-in probing tasks for the four reasoning stages, the toy models' tasks, and user
datasets. ``TASKS`` holds the tasks of the default run (``headprobe run`` without ``--tasks``: every one with a
stage); ``TOY_TASKS`` the probing tasks of the toy models (``headprobe toy``), which are found by name but speak
only about models trained on them, so no default run includes them."""
from __future__ import annotations

from headprobe import HeadprobeError
from headprobe.extract.tasks import builtin, toy
from headprobe.extract.tasks.base import POSITION_RULES, STAGES, Example, Task, assign_splits, dataset_hash

TASKS: dict[str, Task] = {t.name: t for t in builtin.TASKS}
TOY_TASKS: dict[str, Task] = {t.name: t for t in toy.TASKS}


class TaskError(HeadprobeError, ValueError):
    pass


def find_task(name: str) -> Task | None:
    """The built-in or toy task called ``name``, or None."""
    return TASKS.get(name) or TOY_TASKS.get(name)


def get_task(name: str) -> Task:
    task = find_task(name)
    if task is None:
        raise TaskError(f"unknown task {name!r}: run `headprobe tasks` to list them, or pass a .jsonl/.csv file "
                        f"or hf:NAME")
    return task


def resolve_task(ref: str) -> Task:
    """A built-in task by name, a user dataset file (.jsonl / .csv, with ``:STAGE`` appended to give its stage,
    e.g. ``mine.jsonl:KR``, or a ``stage`` column), or ``hf:NAME?text=..&label=..&stage=..`` (a Hugging Face dataset
    with a column mapping; see ``extract/tasks/user.py``)."""
    from headprobe.extract.tasks import user

    if ref.startswith("hf:"):
        return user.load_hf_task(ref)
    path, _, stage = ref.rpartition(":") if ref.rpartition(":")[2] in STAGES else (ref, "", "")
    if path.endswith((".jsonl", ".csv")):
        return user.load_user_task(path, stage=stage)
    return get_task(ref)


__all__ = ["TASKS", "TOY_TASKS", "find_task", "Task", "Example", "TaskError", "get_task", "resolve_task",
           "assign_splits", "dataset_hash", "STAGES", "POSITION_RULES"]
