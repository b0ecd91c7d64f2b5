"""``headprobe tasks``: list the built-in tasks with their stage, size and card."""
from __future__ import annotations

import argparse

from headprobe.extract.tasks import STAGES, TASKS
from headprobe.extract.tasks.builtin import DATA


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="generation seed (sizes do not depend on it)")


def run(args: argparse.Namespace) -> None:
    order = [*STAGES, ""]
    print(f"{'task':<18}{'stage':<7}{'examples':>9}  {'rule':<5}  {'labels':<24}card")
    for name, task in sorted(TASKS.items(), key=lambda kv: (order.index(kv[1].stage), kv[0])):
        n = len(task.examples(args.seed))
        labels = "/".join(task.label_names) if task.label_names else f"({task.label_kind})"
        card = DATA / task.card
        where = f"datasets/{task.card}" if card.is_file() else "(no card)"
        print(f"{name:<18}{task.stage or '-':<7}{n:>9}  {task.position_rule:<5}  {labels[:23]:<24}{where}")
        print(f"{'':<18}{task.description}")
