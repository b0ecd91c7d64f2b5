"""``headprobe tasks``: list the built-in tasks with their stage, size and card."""
from __future__ import annotations

import argparse

from extract.tasks import STAGES, TASKS
from extract.tasks.builtin import DATA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    print(f"{'task':<22}{'stage':<6}{'examples':>9}  {'rule':<5} card / description")
    for name, task in sorted(TASKS.items(), key=lambda kv: (list(STAGES).index(kv[1].stage), kv[0])):
        n = len(task.examples(args.seed))
        print(f"{name:<22}{task.stage:<6}{n:>9}  {task.position_rule:<5} datasets/{task.card}  {task.description}")
