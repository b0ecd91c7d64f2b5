"""Simplified-model training as a check (Olsson et al. 2022): for a toy model trained by ``headprobe toy train``,
the heads its task left a job to, read from the model folder's training record (``toy_training.json``).

Not pooled into the stage map: the training says which head does which job by construction (the task leaves no
other way), so it is the ground truth the probes' stage map is checked against. Its evidence is each job's final
score per head (attention patterns for previous-token and induction heads, the OV circuit for copying and
succession) against the job threshold (0.5); its report section draws the phase change (losses and the job scores
against the training step), tabulates every head, and ablates each head alone. Models without a record give no
evidence (the model is not loaded for that: the record is looked up in the checkpoints' model folder).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.stage_map import STAGE_AXIS
from headprobe.probes.checks.head_scores import HEAD_TYPE_STAGE

JOB_STAGE = {**HEAD_TYPE_STAGE, "copy": "ICI", "successor": "LR"}  # the survey's taxonomy (successor heads: LR)


def _record_of(inputs: AttributionInputs) -> tuple[dict, Path] | None:
    from headprobe.train.toy.record import read_record

    for model_id in sorted({c.config.model_id for c in inputs.checkpoints}):
        folder = Path(model_id)
        rec = read_record(folder) if folder.is_dir() else None
        if rec is not None:
            return rec, folder
    return None


def _agreement(rec: dict, stage_map) -> str:
    """Markdown: per job, its head, the stage the survey gives the job and the stage the probes' map gives it."""
    lines = ["| job | head | score | taxonomy stage | stage in the map |", "|---|---|---|---|---|"]
    for job, j in rec["job_heads"].items():
        got = "-"
        if stage_map is not None and j["layer"] in stage_map.layers:
            d = stage_map.dominant[stage_map.layers.index(j["layer"]), j["head"]]
            got = STAGE_AXIS[d] if d >= 0 else "none"
        lines.append(f"| {job.replace('_', '-')} | L{j['layer']}.H{j['head']} | {j['score']:.2f}"
                     f"{'' if j['done'] else ' (below 0.5)'} | {JOB_STAGE.get(job, '-')} | {got} |")
    return "\n".join(lines)


@register_kind
class ToyTrainingEvidence(EvidenceKind):
    name = "toy_training"
    pooled = False

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        found = _record_of(inputs)
        if found is None:
            return []
        rec, folder = found
        from headprobe.train.toy.check import head_ablations
        from headprobe.train.toy.record import JOB_THRESHOLD

        final = rec["curves"][-1]["scores"]
        ablations = head_ablations(inputs.model.model, rec["task"], rec["data"]["seed"])
        extra = {"record": rec, "folder": str(folder), "ablations": ablations}
        layers = list(range(len(final["head_norm"])))
        return [Evidence(job, JOB_STAGE.get(job, ""), self.name, np.asarray(final[job]), JOB_THRESHOLD, layers,
                         metric=f"final {job.replace('_', '-')} score of the toy training",
                         extra=extra if i == 0 else {}) for i, job in enumerate(rec["jobs"])]

    def section(self, result, folder: Path | None = None, link: str = "") -> str:
        from headprobe.train.toy.report import toy_sections

        mine = [ev for ev in result.evidence if ev.source == self.name and ev.extra]
        if not mine:
            return ""
        extra = mine[0].extra
        text = toy_sections(extra["record"], extra["ablations"], folder, link)
        return (text + "\nThe jobs' heads in the probes' stage map (the training is the ground truth: the task "
                "leaves no other way):\n\n" + _agreement(extra["record"], result.stage_map) + "\n")

    def write(self, result, folder: Path) -> list[Path]:
        mine = [ev for ev in result.evidence if ev.source == self.name and ev.extra]
        if not mine:
            return []
        path = Path(folder) / "toy_training.json"
        extra = mine[0].extra
        path.write_text(json.dumps({"job_heads": extra["record"]["job_heads"], "ablations": extra["ablations"],
                                    "final_loss": extra["record"]["final_loss"], "model": extra["folder"]},
                                   indent=1) + "\n")
        return [path]
