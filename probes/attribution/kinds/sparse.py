"""Evidence from group-lasso probes (one weight group per head): the norm of each head's group on standardised
inputs, exactly zero for a head the probe dropped; the null is 0 (any kept head), or the norms of the same probe
fitted to control labels."""
from __future__ import annotations

import numpy as np
import torch

from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence, null_threshold, over_all_heads
from headprobe.probes.sparse import group_norms


def sparse_evidence(task: str, stage: str, norms: np.ndarray | torch.Tensor, layers: list[int],
                    control_norms: np.ndarray | torch.Tensor | None = None, alpha: float = 0.01,
                    metric: str = "group norm") -> Evidence:
    """Evidence from a sparse (group lasso) probe: each head's group norm (L, H) (:func:`group_norms`); the null
    comes from the group norms of the same probe fitted to control labels, or is 0 without them (any head the group
    lasso kept)."""
    null = null_threshold(np.asarray(control_norms, dtype=np.float64), alpha) if control_norms is not None else 0.0
    return Evidence(task, stage, "sparse", np.asarray(norms, dtype=np.float64), null, layers, metric=metric)


@register_kind
class SparseProbeEvidence(EvidenceKind):
    name = "sparse"
    reads = "SparseProbe"

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        out = []
        for ckpt in inputs.checkpoints_of(self.reads):
            config, tensors = ckpt.config, ckpt.tensors
            norms = tensors["group_norm"] if "group_norm" in tensors else group_norms(tensors["weight"])
            out.append(sparse_evidence(config.task, config.stage,
                                       over_all_heads(norms.double().numpy(), config.heads, config.n_heads),
                                       list(config.layers),
                                       metric="group norm (standardised inputs; null: any kept head)"))
        return out
