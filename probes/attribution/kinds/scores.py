"""Training-free head scores as evidence (:mod:`headprobe.probes.checks.scores`), when an attribution names them
in ``AttributionConfig.scores``; nothing runs otherwise, so the default stage map is unchanged.

Two kinds, because pooling is a property of a kind: ``scores`` (pooled into the stage map: retrieval -> ICI,
negative -> KR, successor -> LR, each with its null so that only heads above it count) and ``score_checks``
(reported beside the map: copying, and the attention-pattern types when named here). ``AttributionConfig.pool_scores``
decides which score goes where. Both read the model through ``inputs.model``; one report section and one set of files
(``scores.csv``, ``scores.json``, ``score_<name>.png``) cover the scores of both kinds, with their agreement with
the probes' evidence.
"""
from __future__ import annotations

from pathlib import Path

from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.checks.scores import SOURCE_CHECK, SOURCE_POOLED, ScoreConfig

SCORE_SOURCES = (SOURCE_POOLED, SOURCE_CHECK)


def _collect(inputs: AttributionInputs, pooled: bool) -> list[Evidence]:
    from headprobe.probes.checks.scores import compute_scores

    names = [s for s in inputs.config.scores if (s in inputs.config.pool_scores) == pooled]
    ScoreConfig(list(inputs.config.scores))  # refuse unknown names, whichever kind runs first
    config = ScoreConfig(names, alpha=inputs.config.alpha, pooled=list(inputs.config.pool_scores))
    result = compute_scores(inputs.model, config)
    for name, why in result.skipped.items():
        inputs.skip(f"{name} score", why)
    return result.evidence


def _all_scores(result) -> list[Evidence]:
    return [ev for ev in result.evidence if ev.source in SCORE_SOURCES]


def _probes(result) -> list[Evidence]:
    return [ev for ev in result.pooled_evidence if ev.source not in SCORE_SOURCES]


class _ScoreKind(EvidenceKind):
    """What both kinds share: the section and the files cover every score once (written by the pooled kind when
    it has evidence, else by the checks)."""

    pooled_scores = True
    outputs = ("scores.csv", "scores.json", "score_*.png")

    def _writes(self, result) -> bool:
        return self.pooled_scores or not result.of_kind(SOURCE_POOLED)

    def enabled(self, config) -> bool:
        return any((s in config.pool_scores) == self.pooled_scores for s in config.scores)

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        return _collect(inputs, self.pooled_scores)

    def section(self, result, folder: Path | None = None, link: str = "") -> str:
        from headprobe.probes.checks.scores_report import scores_section

        if not self._writes(result):
            return ""
        return scores_section(_all_scores(result), result.stage_map, _probes(result), folder, link)

    def write(self, result, folder: Path) -> list[Path]:
        from headprobe.probes.checks.scores_report import write_scores

        return write_scores(_all_scores(result), folder, {"model_id": result.model_id}) if self._writes(result) else []


@register_kind
class ScoreEvidence(_ScoreKind):
    name = SOURCE_POOLED
    pooled = True
    pooled_scores = True


@register_kind
class ScoreCheck(_ScoreKind):
    name = SOURCE_CHECK
    pooled = False
    pooled_scores = False
