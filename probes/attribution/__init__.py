"""Stage 4: attribution. Trained probes and SAEs (and modeling-free checks) -> per-head evidence with nulls -> the
stage map of the four reasoning stages (Zheng et al. 2024).

    evidence.py   Evidence (a score per head with its null); nulls; per-task head ranking
    contract.py   the contract: EvidenceKind, register_kind, AttributionInputs
    kinds/        one module per kind of evidence: linear, sparse, sae, head_types, ablation
    stage_map.py  pooling evidence into stages; the grid, CSV, JSON and Markdown
    result.py     AttributionConfig (settings) and Attribution (the typed result)
    api.py        attribute() -> Attribution, write_attribution(), report_sections()
    cli.py        `headprobe attribute`
"""
from headprobe.probes.attribution.api import attribute, evidence_from_checkpoints, report_sections, write_attribution
from headprobe.probes.attribution.contract import EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.result import Attribution, AttributionConfig

__all__ = ["Attribution", "AttributionConfig", "Evidence", "EvidenceKind", "attribute", "evidence_from_checkpoints",
           "register_kind", "report_sections", "write_attribution"]
