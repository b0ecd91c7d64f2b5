"""The plan of a sparse autoencoder's training run: how many optimizer steps it will take, and what follows from it.

Warm-ups are set in steps (``warmup_steps``, ``sparsity_warmup_steps``) and capped at fractions of the run, so that a
short run still finishes them and spends most of its steps at full strength:

    LR warm-up          at most 10% of the run's steps (it must end long before the LR decay at ``decay_start``)
    sparsity warm-up    at most 25% (ReLU's L1 and JumpReLU's L0 need the rest of the run at their full
                        coefficient to reach their sparsity)

A capped warm-up is reported as a note. BatchTopK's inference threshold is a bias-corrected running average of the
smallest activation each batch keeps: batch t moves it by (1 - m) / (1 - m^(t+1)), so the first batch sets it without
dominating it, and the momentum m is capped so that the average spans about the last 10% of the run
(``batchtopk_momentum`` 0.99 is a window of 100 steps): thresholds from the first steps, when the weights move fast,
are far too high for the final weights. Measured with k 16 on synthetic data: an EMA of momentum 0.99 started at the
first batch gave an inference L0 of 5.3 after 9 steps and 0.6 after 40; this average gives 13.0 and 18.0 (a plain
bias-corrected average over all steps: 4.5 and 9.9).

The width check: an SAE with more latents than training rows can give every row a latent of its own and memorise the
training set (4,608 latents on 1,400 rows: train FVE 1.000, test FVE 0.18). Measured on synthetic sparse data with
dense noise (TopK, k 8, d_in 64, 800 steps of 256 rows), the train-test FVE gap with 512 latents was 0.88 at 1 row
per latent, 0.40 at 4, 0.22 at 8 and 0.10 at 16 (2,048 latents: 0.58 at 1, 0.35 at 2). :func:`width_warning` warns
below ``WARN_ROWS_PER_LATENT`` training rows per latent and suggests a width with ``SUGGEST_ROWS_PER_LATENT``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

LR_WARMUP_CAP = 0.1
SPARSITY_WARMUP_CAP = 0.25
THRESHOLD_WINDOW = 0.1
WARN_ROWS_PER_LATENT = 4
SUGGEST_ROWS_PER_LATENT = 16


@dataclass
class RunPlan:
    """What a run of ``steps`` optimizer steps (inf: unknown) uses: warm-up lengths in steps, the BatchTopK threshold
    momentum, and notes on what was capped."""

    steps: float = math.inf
    warmup: int = 0
    sparsity_warmup: int = 0
    threshold_momentum: float = 0.99
    notes: list[str] = field(default_factory=list)


def _cap(option: str, asked: int, frac: float, steps: float, notes: list[str]) -> int:
    if not math.isfinite(steps) or asked <= frac * steps:
        return asked
    capped = int(frac * steps)
    instead = f"warming up over {capped} instead" if capped else "no warm-up"
    notes.append(f"--model.{option} {asked} is more than {frac:.0%} of this run's {int(steps)} steps: {instead}")
    return capped


def plan_run(hp, steps: float) -> RunPlan:
    """The plan for a run of ``steps`` optimizer steps under the SAE's hyperparameters ``hp``."""
    notes: list[str] = []
    warmup = _cap("warmup_steps", hp.warmup_steps, LR_WARMUP_CAP, steps, notes)
    sparsity = _cap("sparsity_warmup_steps", hp.sparsity_warmup_steps, SPARSITY_WARMUP_CAP, steps, notes)
    momentum = hp.batchtopk_momentum
    if math.isfinite(steps):
        momentum = min(momentum, max(0.0, 1 - 1 / (THRESHOLD_WINDOW * steps)))
    return RunPlan(steps, warmup, sparsity, momentum, notes)


def planned_steps(trainer, token_budget: int) -> float:
    """Optimizer steps a fit will take (an estimate): the least of the Trainer's limits and of the steps that reach
    ``token_budget`` when the datamodule says how many training rows an epoch holds; inf when nothing bounds it."""
    steps = float(trainer.estimated_stepping_batches)
    dm = trainer.datamodule
    if not token_budget or dm is None or not hasattr(dm, "split_rows"):
        return steps
    world = trainer.world_size
    rows = len(dm.split_rows["train"])
    per_rank = rows // world if world > 1 else rows  # training shares are equal (train/data.py: EpochBatches)
    if not per_rank:
        return steps
    batch = min(dm.batch_size or per_rank, per_rank)
    epochs, rest = divmod(token_budget, per_rank * world)
    batches = epochs * math.ceil(per_rank / batch) + math.ceil(rest / (batch * world))
    return min(steps, math.ceil(batches / trainer.accumulate_grad_batches))


def threshold_rate(step: int, momentum: float) -> float:
    """How far batch ``step`` (0, 1, ...) moves a bias-corrected running average of momentum ``momentum`` in [0, 1)
    towards its value: 1 at step 0, then (1 - m) / (1 - m^(step + 1)), down to 1 - m."""
    return (1 - momentum) / (1 - momentum ** (step + 1))


def width_warning(d_sae: int, rows: int) -> str | None:
    """A one-line warning when ``d_sae`` latents are too many for ``rows`` training rows, with a width to use."""
    if not rows or d_sae * WARN_ROWS_PER_LATENT <= rows:
        return None
    suggested = max(1, rows // SUGGEST_ROWS_PER_LATENT)
    return (f"the SAE's {d_sae} latents are too many for {rows} training rows (fewer than {WARN_ROWS_PER_LATENT} rows "
            f"per latent): it will memorise them (train FVE near 1, test FVE far lower); pass --model.d_sae "
            f"{suggested} or fewer, or train on more rows")
