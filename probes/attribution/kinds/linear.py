"""Evidence from per-head linear probes (ITI, Li et al. 2023): each head's held-out accuracy against the accuracy
of the same probes on control labels (Hewitt & Liang 2019) as its null."""
from __future__ import annotations

import numpy as np

from headprobe import InputError
from headprobe.probes.attribution.contract import AttributionInputs, EvidenceKind, register_kind
from headprobe.probes.attribution.evidence import Evidence, over_all_heads, probe_importance, selectivity
from headprobe.probes.checkpoint import Checkpoint


def linear_evidence(task: str, stage: str, val_acc: np.ndarray, control_acc: np.ndarray, layers: list[int],
                    alpha: float = 0.01, n_val: int | None = None) -> Evidence:
    """Evidence from per-head linear probes: val accuracy (L, H) against the control probes' accuracy (L, H)."""
    score, null = probe_importance(val_acc, control_acc, alpha, n_val)
    sel = selectivity(val_acc, control_acc)
    return Evidence(task, stage, "linear", score, null, layers, metric="val accuracy",
                    extra={"selectivity": sel.tolist()})


def fitted_controls(checkpoint: Checkpoint, split: str) -> list[str]:
    """The control label sets the probe was fitted with, in the order of its metric tables: from the checkpoint's
    config where it records them, else from its metric keys (checkpoints of headprobe 0.1 record none)."""
    recorded = checkpoint.config.hparams.get("controls")
    if recorded:
        return list(recorded)
    prefix = f"{split}/selectivity_"
    return [k[len(prefix):].rsplit("_max", 1)[0] for k in checkpoint.metrics if k.startswith(prefix)]


def from_checkpoint(checkpoint: Checkpoint, n_val: int | None, alpha: float) -> Evidence:
    """A LinearProbes checkpoint's evidence, from the per-head tables of its metrics (val, else test)."""
    config, metrics = checkpoint.config, checkpoint.metrics
    split = "val" if "val" in metrics else "test"
    table = metrics.get(split, {})
    key = "acc" if "acc" in table else "r2"
    if key not in table:
        raise InputError(f"linear probe checkpoint for task {config.task!r} has no per-head {split} metrics in "
                         f"metrics.json: export it after validation (headprobe train runs it)")
    values = np.asarray(table[key], dtype=np.float64)  # (K, L, G): the task, then each control
    width = len(config.heads) if config.heads else config.n_heads
    if values.shape[2] != width:
        raise InputError(f"linear probe for task {config.task!r} was trained per layer (scope=layer): retrain with "
                         f"scope=head to attribute heads")
    controls = fitted_controls(checkpoint, split)
    if values.shape[0] < 2 or not controls:
        raise InputError(f"linear probe for task {config.task!r} has no control probes: retrain with controls "
                         f"(e.g. controls: [control, shuffled]) so there is a null to compare heads with")
    null_from = "shuffled" if "shuffled" in controls else controls[0]
    full = lambda a: over_all_heads(a, config.heads, config.n_heads)  # noqa: E731
    ev = linear_evidence(config.task, config.stage, full(values[0]), full(values[1 + controls.index(null_from)]),
                         list(config.layers), alpha, n_val)
    ev.metric = f"{split} {'accuracy' if key == 'acc' else 'R^2'} (null from the {null_from} control)"
    ev.extra["selectivity"] = {c: (values[0] - values[1 + i]).tolist() for i, c in enumerate(controls)}
    return ev


@register_kind
class LinearProbeEvidence(EvidenceKind):
    name = "linear"
    reads = "LinearProbes"

    def collect(self, inputs: AttributionInputs) -> list[Evidence]:
        out = []
        for ckpt in inputs.checkpoints_of(self.reads):
            config = ckpt.config
            same = [s for s in inputs.stores
                    if s.meta.task == config.task and s.meta.weights_hash == config.weights_hash]
            n_val = config.data.get("split_rows", {}).get("val") or (len(same[0].rows("val")) if same else None)
            out.append(from_checkpoint(ckpt, n_val, inputs.config.alpha))
        return out
