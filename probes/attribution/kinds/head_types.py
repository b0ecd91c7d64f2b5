"""Attention-pattern head types as a cross-check (modeling-free; Olsson et al. 2022): every head's
previous-token, duplicate-token and induction score, against the type threshold as its null. Not pooled into the
stage map: the report sets each evidence of the map beside these scores (Spearman rho, shared top heads, AUROC for
the typed heads) and plots the copy task's evidence against the induction scores."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.stage_map import STAGE_AXIS
from headprobe.probes.checks.head_scores import (HEAD_TYPE_STAGE, HEAD_TYPES, TYPE_THRESHOLD, copy_carriers,
                                                 head_type_scores, head_types, plot_against_pattern, rank_agreement,
                                                 top_overlap, typed_auroc)

TOP_SHARED = 8


def head_type_section(scores: dict[str, np.ndarray], evidence: list[Evidence], stage_map,
                      folder: Path | None = None, link: str = "") -> str:
    """The report's cross-check section; with ``folder``, also ``induction_check.png`` there (linked as
    ``link + name``) for the copy tasks."""
    from headprobe.extract.tasks import TASKS

    out = ["## Attention-pattern cross-check", "",
           f"Scores on [BOS, r1..r50, r1..r50] (TransformerLens 'mul' score; a head is typed above {TYPE_THRESHOLD}). "
           "The survey puts previous-token and duplicate-token heads in ICI and induction heads in LR.", "",
           "| head | type(s) | scores (prev / dup / ind) | taxonomy stage | stage in the map |",
           "|---|---|---|---|---|"]
    typed = head_types(scores)
    for (layer, head), types in sorted(typed.items()):
        vals = " / ".join(f"{scores[t][layer, head]:.2f}" for t in ("previous_token", "duplicate_token", "induction"))
        got = ""
        if layer in stage_map.layers:
            d = stage_map.dominant[stage_map.layers.index(layer), head]
            got = STAGE_AXIS[d] if d >= 0 else "none"
        out.append(f"| L{layer}.H{head} | {', '.join(types)} | {vals} | "
                   f"{', '.join(sorted({HEAD_TYPE_STAGE[t] for t in types}))} | {got} |")
    out += ["", "Spearman rho over heads between each evidence's score and the pattern scores, how many of the "
            f"evidence's top {TOP_SHARED} heads are among the top {TOP_SHARED} induction heads, and how well the "
            f"evidence separates the heads typed induction from the rest (AUROC over its heads; 0.5: not at all):", "",
            f"| evidence | stage | previous-token | duplicate-token | induction | induction top-{TOP_SHARED} shared "
            "| induction-typed AUROC |", "|---|---|---|---|---|---|---|"]
    for ev in evidence:
        rows = ev.layers
        rhos = [rank_agreement(ev.score, scores[t][rows]) for t in ("previous_token", "duplicate_token", "induction")]
        few = np.size(ev.score) < 4 * TOP_SHARED  # e.g. an SAE on one layer: its top 8 of 9 heads would be trivial
        shared = "-" if few else f"{top_overlap(ev.score, scores['induction'][rows], TOP_SHARED)}/{TOP_SHARED}"
        auroc = "-" if few else f"{typed_auroc(ev.score, scores['induction'][rows]):.2f}"
        out.append(f"| {ev.task}/{ev.source} | {ev.stage} | " + " | ".join(f"{r:.2f}" for r in rhos)
                   + f" | {shared} | {auroc} |")
    copying = [ev for ev in evidence if getattr(TASKS.get(ev.task), "metric", "") == "induction" and len(ev.layers) > 1]
    if folder is not None and copying:
        panels = [(f"{ev.task}/{ev.source}" + (f" ({ev.metric})" if ev.metric else ""), ev.score, ev.layers)
                  for ev in copying]
        plot_against_pattern(scores["induction"], panels, Path(folder) / "induction_check.png")
        out += ["", "Each head of the copy task's evidence against its induction score (colour: layer):", "",
                f"![copy task against induction scores]({link}induction_check.png)", ""]
        for ev in copying:
            above = np.where(ev.excess() > 0, ev.score, np.nan)
            n, m, first = copy_carriers(above, ev.layers, scores["induction"], 2 * TOP_SHARED)
            if first is not None and m:
                out.append(f"- {ev.task}/{ev.source}: {n} of its top {m} heads above the null sit after layer "
                           f"{first} (the first with an induction head) and score <= {TYPE_THRESHOLD} on induction"
                           + (". They carry the copied token without an induction pattern (read, e.g., from the "
                              "residual stream the induction heads wrote to): a probe counts them, the attention "
                              "pattern does not, and rho drops." if n else "."))
    return "\n".join(out + [""])


def scores_of(evidence: list[Evidence]) -> dict[str, np.ndarray]:
    """{head type: (L, H) pattern scores} from this kind's evidence."""
    return {ev.task: ev.score for ev in evidence if ev.source == HeadTypeEvidence.name}


@register_kind
class HeadTypeEvidence(EvidenceKind):
    name = "head_types"
    outputs = ("head_types.csv", "induction_check.png")
    pooled = False

    def enabled(self, config) -> bool:
        return config.head_scores

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        scores = head_type_scores(inputs.model.model)
        layers = list(range(scores[HEAD_TYPES[0]].shape[0]))
        return [Evidence(t, HEAD_TYPE_STAGE[t], self.name, scores[t], TYPE_THRESHOLD, layers,
                         metric="attention-pattern score ('mul', TransformerLens)") for t in HEAD_TYPES]

    def section(self, result, folder: Path | None = None, link: str = "") -> str:
        return head_type_section(scores_of(result.evidence), result.pooled_evidence, result.stage_map, folder, link)

    def write(self, result, folder: Path) -> list[Path]:
        scores = scores_of(result.evidence)
        path = Path(folder) / "head_types.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "head", *HEAD_TYPES])
            for layer in range(scores["induction"].shape[0]):
                for head in range(scores["induction"].shape[1]):
                    w.writerow([layer, head, *(f"{scores[t][layer, head]:.4f}" for t in HEAD_TYPES)])
        return [path]
