"""Single-head ablations of a toy model on its task's evaluation batch: which heads the mechanism needs.

Each head in turn is mean-ablated (its z replaced by its mean over the evaluation batch's tokens; zero ablation on
request) with :class:`headprobe.probes.checks.ablation.HeadAblation`, and the loss on each of the batch's masks is
measured. For the induction task the *in-context drop* is the first copy's loss minus the second copy's: ablating
the induction head or the previous-token head that feeds it should erase it, ablating any other head should not.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headprobe.extract.hooks import head_layout
from headprobe.probes.checks.ablation import HeadAblation, head_means
from headprobe.train.toy.tasks import IGNORE, TASKS, ToyBatch


@torch.no_grad()
def mask_losses(model: nn.Module, batch: ToyBatch) -> dict[str, float]:
    """Mean cross-entropy of ``batch.targets`` over each mask: {mask: loss}."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.ids.to(device)).logits.float()  # (B, S, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets.to(device), ignore_index=IGNORE,
                                           reduction="none").cpu()
    return {k: float(ce[m].mean()) for k, m in batch.masks.items()}


def in_context_drop(losses: dict[str, float]) -> float:
    """First copy's loss minus the second copy's (NaN for a task without the two)."""
    return losses["first"] - losses["second"] if "second" in losses else float("nan")


def head_ablations(model: nn.Module, task: str, seed: int = 0, mode: str = "mean") -> dict:
    """Losses of the clean model and with each head ablated alone, on ``task``'s evaluation batch:
    {"clean": {mask: loss}, "ablated": [[{mask: loss} per head] per layer], "mode": mode}."""
    batch = TASKS[task].evaluate(seed)
    layout = head_layout(model)
    device = next(model.parameters()).device
    means = head_means(model, [{"input_ids": batch.ids.to(device)}]) if mode == "mean" else None
    ablated = []
    for layer in range(layout.n_layers):
        row = []
        for head in range(layout.n_heads):
            with HeadAblation(model, [(layer, head)], mode=mode, means=means):
                row.append(mask_losses(model, batch))
        ablated.append(row)
    return {"clean": mask_losses(model, batch), "ablated": ablated, "mode": mode}


def ablation_table(result: dict, jobs: dict[str, dict] | None = None) -> str:
    """Markdown: one row per head with its losses ablated (and the in-context drop), its job if it has one."""
    masks = list(result["clean"])
    named = {(j["layer"], j["head"]): name for name, j in (jobs or {}).items() if j.get("done")}
    drop = "second" in masks
    head = "| head | job | " + " | ".join(f"loss, {m}" for m in masks) + (" | in-context drop |" if drop else " |")
    lines = [head, "|" + "---|" * (2 + len(masks) + drop)]
    rows = [("clean", "", result["clean"])] + [
        (f"L{i}.H{j}", named.get((i, j), ""), losses)
        for i, layer in enumerate(result["ablated"]) for j, losses in enumerate(layer)]
    for name, job, losses in rows:
        cells = " | ".join(f"{losses[m]:.3f}" for m in masks)
        lines.append(f"| {name} | {job.replace('_', '-')} | {cells} |"
                     + (f" {in_context_drop(losses):.3f} |" if drop else ""))
    return "\n".join(lines)


def drops(result: dict) -> np.ndarray:
    """(L, H) in-context drop with each head ablated."""
    return np.array([[in_context_drop(h) for h in layer] for layer in result["ablated"]])
