"""Evidence from group-lasso probes (one weight group per head): the norm of each head's group on standardised
inputs, exactly zero for a head the probe dropped; the null is 0 (any kept head), or the norms of the same probe
fitted to control labels."""
from __future__ import annotations

import numpy as np
import torch

from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence, null_threshold, over_all_heads


def group_norms(weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """L2 norm of each head's weight group: (L, H, D[, C]) -> (L, H)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return w.flatten(2).norm(dim=2).numpy()


def sparse_evidence(task: str, stage: str, weights: np.ndarray | torch.Tensor,
                    control_weights: np.ndarray | torch.Tensor | None, layers: list[int],
                    alpha: float = 0.01) -> Evidence:
    """Evidence from a sparse (group lasso) probe: group norms of the weights (L, H, D[, C]); the null comes from
    the group norms of the same probe fitted to control labels (0 when none is given: any selected head)."""
    score = group_norms(weights)
    null = null_threshold(group_norms(control_weights), alpha) if control_weights is not None else 0.0
    return Evidence(task, stage, "sparse", score, null, layers, metric="group norm")


@register_kind
class SparseProbeEvidence(EvidenceKind):
    name = "sparse"
    reads = "SparseProbe"

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        out = []
        for ckpt in inputs.checkpoints_of(self.reads):
            config, tensors = ckpt.config, ckpt.tensors
            norms = (tensors["group_norm"].double().numpy() if "group_norm" in tensors
                     else group_norms(tensors["weight"]))
            out.append(Evidence(config.task, config.stage, self.name,
                                over_all_heads(norms, config.heads, config.n_heads), 0.0, list(config.layers),
                                metric="group norm (standardised inputs; null: any kept head)"))
        return out
