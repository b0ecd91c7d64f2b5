"""Steering as evidence: each task's top K heads by its linear probes' val accuracy, shifted along their mass-mean
directions (inference-time intervention, :mod:`headprobe.probes.steering`), against the same heads along random
directions and random heads along their own (:mod:`headprobe.probes.checks.steer`).

Not pooled into the stage map. Per task (a two-class choice task whose LinearProbes checkpoint and training store
were given), the steered heads carry the change of the answer margin at :data:`ALPHA`, against the upper end of
the larger of the two controls' 95% prediction intervals of one draw as the null (other heads NaN); the whole
sweep (:data:`ALPHAS`, :data:`DRAWS` draws of each control, ``config.examples`` held-out examples,
:data:`CORPUS_TOKENS` corpus tokens for the side effect) rides in ``extra["result"]``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headprobe.extract.tasks import TASKS
from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.checks.steer import SteerResult, steer_sweep
from headprobe.probes.checks.steer_report import steer_section, write_csv

ALPHAS = (0.0, 1.0, 2.0, 5.0)  # the sweep of the check
ALPHA = 2.0  # the strength whose effect is the evidence
DRAWS = 4  # draws of each control per alpha
CORPUS_TOKENS = 512


def steerable(checkpoint) -> str:
    """Why a LinearProbes checkpoint's task cannot be steered and measured ("" if it can)."""
    task = TASKS.get(checkpoint.config.task)
    hp = checkpoint.config.hparams
    if task is None or task.metric != "choice" or len(task.label_names) != 2:
        return "not a built-in two-class choice task"
    if hp.get("loss") != "logistic" or hp.get("scope", "head") != "head" or "mass_mean" not in checkpoint.tensors:
        return "its probes are not per-head logistic probes with mass-mean directions"
    return ""


def _store_of(checkpoint, stores: list):
    """The store the checkpoint was trained on (same model, task and data), or None."""
    cfg = checkpoint.config
    return next((s for s in stores if s.meta.task == cfg.task and s.meta.weights_hash == cfg.weights_hash
                 and s.meta.dataset_hash == cfg.data.get("dataset_hash", s.meta.dataset_hash)), None)


def run_steering(inputs: AttributionInputs, k: int) -> dict[str, SteerResult]:
    """The sweep of every steerable task that has a LinearProbes checkpoint and its store among the inputs."""
    from headprobe.probes.checkpoint import load_local

    results = {}
    for ckpt in inputs.checkpoints_of("LinearProbes"):
        task = ckpt.config.task
        if task in results:
            continue
        why = steerable(ckpt) or ("" if _store_of(ckpt, inputs.stores) else "its training store was not given")
        if why:
            print(f"attribute: {task}: not steered ({why})")
            continue
        results[task] = steer_sweep(inputs.model, load_local(ckpt.folder), _store_of(ckpt, inputs.stores),
                                    (k,), ALPHAS, n_examples=inputs.config.examples, draws=DRAWS,
                                    corpus_tokens=CORPUS_TOKENS, log=lambda line: print(f"attribute: {line}"))
    return results


def steer_evidence(result: SteerResult, n_layers: int, n_heads: int, alpha: float = ALPHA) -> Evidence:
    """One task's sweep as evidence over (layers, heads): the margin's change at ``alpha`` on its steered heads."""
    k = result.ks[0]
    s = result.summary(k, alpha, "margin")
    score = np.full((n_layers, n_heads), np.nan)
    null = np.full_like(score, np.nan)
    for layer, head in result.top_heads[k]:
        score[layer, head] = s["probe"]
        null[layer, head] = max(s["random_direction"]["pi"][1], s["random_heads"]["pi"][1])
    return Evidence(result.task, result.stage, SteerEvidence.name, score, null, list(range(n_layers)),
                    metric=f"margin change with the top {k} heads steered at alpha={alpha:g}",
                    extra={"result": result.to_dict()})


def results_of(evidence: list[Evidence]) -> dict[str, SteerResult]:
    return {ev.task: SteerResult.from_dict(ev.extra["result"]) for ev in evidence if ev.source == SteerEvidence.name}


@register_kind
class SteerEvidence(EvidenceKind):
    name = "steer"
    outputs = ("steer.json", "steer.csv", "steer.png")
    pooled = False
    reads = "LinearProbes"

    def enabled(self, config) -> bool:
        return config.steer > 0

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        from headprobe.extract.hooks import head_layout

        results = run_steering(inputs, inputs.config.steer)
        if not results:
            return []
        layout = head_layout(inputs.model.model)
        return [steer_evidence(r, layout.n_layers, layout.n_heads) for r in results.values()]

    def section(self, result, folder: Path | None = None, link: str = "") -> str:
        return steer_section(results_of(result.evidence), folder, link, alphas=[ALPHA])

    def write(self, result, folder: Path) -> list[Path]:
        results = results_of(result.evidence)
        path = Path(folder) / "steer.json"
        path.write_text(json.dumps({t: r.to_dict() for t, r in results.items()}, indent=1, default=float) + "\n")
        return [write_csv(results, Path(folder) / "steer.csv"), path]
