"""The typed settings and result of an attribution: :class:`AttributionConfig` in, :class:`Attribution` out."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from headprobe import InputError
from headprobe.probes.attribution.evidence import Evidence
from headprobe.probes.attribution.stage_map import StageMap

RESULT_FILE = "attribution.json"


@dataclass
class AttributionConfig:
    """Settings of an attribution (``headprobe attribute`` options of the same names).

    Args:
        alpha: family-wise level of the nulls (Bonferroni over heads)
        top: heads listed per stage in the report
        reduce: pooling over a stage's evidence (mean or max)
        scale: each evidence's excess over its null divided by its total (share: a head's share of what the task
            found) or by its largest (max: how close a head comes to the task's best head)
        head_scores: also score previous-token, duplicate-token and induction heads from attention patterns
        ablate: ablate each task's top-k heads against k random heads (0: no ablation check)
        ablation: mean or zero ablation
        draws: random-head draws per task (at least 2)
        random_from: where the random heads come from: all layers, layer-matched to the top heads, or both
        examples: task examples per ablation metric
        metric: ablation metric: auto (the continuous one) or accuracy
        max_rows: labelled rows per store on which SAE latents are tied to tasks
        scores: training-free head scores to compute from the model (see ``headprobe scores``)
        pool_scores: which of them join the stage map (the others are reported beside it)
        steer: steer each task's top-k heads along their probe directions against controls (0: no steering check)
    """

    alpha: float = 0.01
    top: int = 8
    reduce: Literal["mean", "max"] = "mean"
    scale: Literal["share", "max"] = "share"
    head_scores: bool = False
    ablate: int = 0
    ablation: Literal["mean", "zero"] = "mean"
    draws: int = 10
    random_from: Literal["all", "layers", "both"] = "both"
    examples: int = 64
    metric: Literal["auto", "accuracy"] = "auto"
    max_rows: int = 20000
    scores: list[str] = field(default_factory=list)
    pool_scores: list[str] = field(default_factory=lambda: ["retrieval", "negative", "successor"])
    steer: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha {self.alpha}: a level between 0 and 1, such as 0.01")
        if self.ablate < 0 or self.top < 1 or self.examples < 1:
            raise InputError(f"--ablate {self.ablate}, --top {self.top}, --examples {self.examples}: pass --ablate 0 "
                             f"or more, --top and --examples 1 or more")
        if self.ablate and self.draws < 2:
            raise InputError(f"--draws {self.draws}: the ablation check needs at least 2 random draws")


@dataclass
class Attribution:
    """What an attribution found: every kind's evidence, the stage map pooled from the pooled kinds, and where it
    came from."""

    config: AttributionConfig
    evidence: list[Evidence]
    stage_map: StageMap
    model_id: str = ""
    checkpoints: list[str] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each kind's time (loading the model counts in the first)
    skipped: dict[str, str] = field(default_factory=dict)  # each check the model cannot have -> why

    @property
    def pooled_evidence(self) -> list[Evidence]:
        return self.stage_map.evidence

    def of_kind(self, name: str) -> list[Evidence]:
        return [ev for ev in self.evidence if ev.source == name]

    def to_json(self) -> dict:
        pooled = {id(ev) for ev in self.stage_map.evidence}
        return {"config": asdict(self.config), "model_id": self.model_id, "checkpoints": self.checkpoints,
                "stores": self.stores, "seconds": self.seconds, "skipped": self.skipped, "pooled": [id(ev) in pooled for ev in self.evidence],
                "evidence": [ev.to_json() for ev in self.evidence],
                "stage_map": {"layers": self.stage_map.layers, "scores": self.stage_map.scores.tolist(),
                              "scale": self.stage_map.scale, "reduce": self.stage_map.reduce}}

    @classmethod
    def from_json(cls, data: dict) -> "Attribution":
        evidence = [Evidence.from_json(e) for e in data["evidence"]]
        pooled = [ev for ev, p in zip(evidence, data["pooled"]) if p]
        sm = data["stage_map"]
        stage_map = StageMap(sm["layers"], np.asarray(sm["scores"], dtype=np.float64), pooled, sm["scale"],
                             sm["reduce"])
        return cls(AttributionConfig(**data["config"]), evidence, stage_map, data["model_id"], data["checkpoints"],
                   data.get("stores", []), data.get("seconds", {}), data.get("skipped", {}))

    @classmethod
    def load(cls, folder: str | Path) -> "Attribution":
        """The attribution :func:`write_attribution` wrote into ``folder``."""
        return cls.from_json(json.loads((Path(folder) / RESULT_FILE).read_text()))
