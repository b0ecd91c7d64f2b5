"""Linear probes for every (layer, head) at once: one weight tensor, one forward, one batched Newton solver.

The reference recipe (ITI) fits one scikit-learn ``LogisticRegression(C=1)`` per head. Here all P = L x G probes
(G = H heads per layer, or G = 1 probe per layer over all its heads) are solved together by the batched Newton
solver of :mod:`~headprobe.probes.newton` (sklearn's objective: log-loss or squared error plus l2 / 2 ||w||^2).

Streamed minibatches: each training epoch is one Newton step; the batches add up the gradient and Hessian at the
current weights, and the last batch of the epoch solves for the step (or backtracks a probe whose objective rose).
The whole split in one batch (``batch_size=0``, in memory): the epoch takes every Newton step on that batch, so
training is one epoch.

Controls (Hewitt & Liang 2019) are extra probes on the same activations with other labels, solved in the same
batch: ``control`` gives every word type (the token at the row, or the example group) a random label drawn from
the label distribution; ``shuffled`` permutes the labels within each split. Selectivity = accuracy - control
accuracy. A control whose training labels take one value (``control`` on a task read at one token: every row has
the same token id) has no optimum to fit; it is skipped, with the reason in the metrics (``controls_skipped``) and
a warning. The ITI mass-mean direction (mean of positives - mean of negatives, unit norm, with the midpoint of the
two means' projections as its threshold) is computed per head for binary tasks.
"""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch import Tensor

from headprobe import InputError
from headprobe.probes.checkpoint import CheckpointConfig, init_hparams, register
from headprobe.probes.hub import FromPretrained
from headprobe.probes.metrics import bootstrap_ci, predictions, probe_metrics
from headprobe.probes.newton import LOSSES, NewtonState, newton_stats, probe_logits
from headprobe.probes.probe_eval import SplitEval

CONTROLS = ("control", "shuffled")
CONTROL_BY = ("token_id", "group", "example_id")  # store columns that name a row's word type
log = logging.getLogger(__name__)


def control_labels(labels: np.ndarray, split: np.ndarray, types: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Labels of a control task for every row.

    control: each type (e.g. token id) gets one label drawn from the train split's labels (Hewitt & Liang);
    shuffled: the labels permuted within each split."""
    rng = np.random.default_rng((seed, CONTROLS.index(kind)))
    if kind == "shuffled":
        out = labels.copy()
        for s in np.unique(split):
            idx = np.flatnonzero(split == s)
            out[idx] = labels[rng.permutation(idx)]
        return out
    if kind != "control":
        raise InputError(f"unknown control {kind!r}: choose from {', '.join(CONTROLS)}")
    uniq, inv = np.unique(types, return_inverse=True)
    pool = labels[split == 0] if (split == 0).any() else labels
    return rng.choice(pool, size=len(uniq))[inv]


def fittable_controls(columns: dict[str, np.ndarray], train: np.ndarray, controls: list[str], control_by: str,
                      seed: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The label sets (N,) of the controls that can be fitted, by name, and why each other control is skipped.

    ``columns`` holds the store's per-row "label", "split" and ``control_by`` arrays; ``train`` the training rows.
    A control whose training labels take one value has no optimum under the logistic loss (its intercept grows
    without end: the solver would run to ``max_steps``) and nothing to predict, so no baseline for selectivity."""
    fitted, skipped = {}, {}
    for c in controls:
        labels = control_labels(columns["label"], columns["split"], columns[control_by], c, seed)
        if len(np.unique(labels[train])) > 1:
            fitted[c] = labels
        elif c == "control" and len(np.unique(columns[control_by][train])) == 1:
            at = " (read at one token)" if control_by == "token_id" else ""
            skipped[c] = f"every training row has the same {control_by}{at}, so the control task has one label"
        else:
            skipped[c] = f"its labels on the training rows take one value, so the {c} task has one label"
    return fitted, skipped


@register
class LinearProbes(SplitEval, FromPretrained, L.LightningModule):
    """Linear probes on every (layer, head) of a store, trained at once.

    Args:
        loss: "auto" (from the store's labels), "logistic", "softmax" or "ridge".
        scope: "head" (one probe per layer and head) or "layer" (one probe per layer over all its heads).
        l2: L2 penalty on the summed loss (sklearn's 1 / C; ITI uses C = 1).
        tol: stop when every probe's gradient of the mean loss is below this.
        max_steps: stop after this many Newton steps (whatever the epoch count).
        controls: control label sets fitted alongside ("control", "shuffled"); one whose training labels take one
            value is skipped (``controls_skipped`` in the metrics says why; ``fitted_controls`` lists the others).
        control_by: what a control-task "word type" is: a store column ("token_id", "group", "example_id").
        top_k: heads that get bootstrap confidence intervals; n_boot: bootstrap resamples.
        seed: seed of the control labels and the bootstrap.
        dtype: "float64" or "float32" for the solver.
        n_layers, n_groups, n_features, n_classes: the weight shape; filled from the data at setup.
    """

    # Each epoch's sums make one Newton step, and a step is kept only if it lowered the objective: every epoch
    # must sum over the same rows, all of them (``StoreDataModule`` then gives DDP ranks every row once).
    full_pass_epochs = True

    def __init__(self, loss: str = "auto", scope: str = "head", l2: float = 1.0, tol: float = 1e-8,
                 max_steps: int = 50, controls: list[str] = ["control", "shuffled"], control_by: str = "token_id",
                 top_k: int = 16, n_boot: int = 1000, seed: int = 0, dtype: str = "float64", n_layers: int = 0,
                 n_groups: int = 0, n_features: int = 0, n_classes: int = 0):
        super().__init__()
        if scope not in ("head", "layer"):
            raise InputError(f"--model.scope {scope!r}: choose head or layer")
        if loss not in LOSSES:
            raise InputError(f"--model.loss {loss!r}: choose one of {', '.join(LOSSES)}")
        if not l2 >= 0:
            raise InputError(f"--model.l2 {l2}: the ridge penalty must be 0 or more")
        for c in controls:
            if c not in CONTROLS:
                raise InputError(f"--model.controls: unknown control {c!r}: choose from {', '.join(CONTROLS)}")
        if control_by not in CONTROL_BY:
            raise InputError(f"--model.control_by {control_by!r}: choose one of {', '.join(CONTROL_BY)}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.meta, self.layers, self.heads = None, None, None
        self.tables: dict[str, dict[str, np.ndarray]] = {}  # split -> name -> (K, L, G) arrays
        self.summary: dict[str, float] = {}
        self._outputs: dict[str, list] = {}
        self.fitted_controls: list[str] = list(controls)  # setup() leaves out those that cannot be fitted
        self.controls_skipped: dict[str, str] = {}  # control -> why it was not fitted
        if n_layers:
            self._build()

    # --- shapes ----------------------------------------------------------------------------------------------
    @property
    def label_sets(self) -> list[str]:
        return ["task", *self.fitted_controls]

    def _build(self) -> None:
        hp = self.hparams
        dtype = getattr(torch, hp.dtype)
        K, P = len(self.label_sets), hp.n_layers * hp.n_groups
        C = hp.n_classes if hp.loss == "softmax" else 1
        self.newton = NewtonState(K, P, hp.n_features, C, dtype)
        self.row_labels = torch.zeros(K, 0, dtype=torch.float64)  # (K, rows): labels of every label set
        self.mass_mean = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        hp = self.hparams
        loss, C = self._bind(dm)
        per_layer = hp.scope == "layer"
        shape = dict(loss=loss, n_layers=dm.n_layers, n_groups=1 if per_layer else dm.n_heads,
                     n_features=dm.meta.d_head * (dm.n_heads if per_layer else 1), n_classes=C if C > 1 else 2)
        if loss == "ridge":
            shape["n_classes"] = 1
        columns = dm.columns()
        controls, skipped = fittable_controls(columns, dm.split_rows["train"], hp.controls, hp.control_by, hp.seed)
        self._note_skipped(str(dm.path), skipped, list(controls))
        self.fitted_controls, self.controls_skipped = list(controls), skipped
        if not hp.n_layers or any(hp[k] != v for k, v in shape.items()) or len(self.newton.W) != len(self.label_sets):
            hp.update(shape)
            self._build()
        self.row_labels = torch.from_numpy(np.stack([columns["label"], *controls.values()]).astype(np.float64))

    def _note_skipped(self, path: str, skipped: dict[str, str], fitted: list[str]) -> None:
        """One warning line per newly skipped control, naming the controls fitted instead."""
        if skipped == self.controls_skipped or not self.trainer.is_global_zero:
            return
        instead = (f"selectivity uses {', '.join(fitted)} instead" if fitted else
                   "no control is left, so no selectivity: add --model.controls [shuffled]")
        for c, why in skipped.items():
            log.warning(f"{path}: control {c!r} skipped: {why}; {instead}")

    # --- forward ---------------------------------------------------------------------------------------------
    def features(self, z: Tensor) -> Tensor:
        """(B, L, H, D) -> (B, P, F) with P = L x G."""
        B, Ln = z.shape[:2]
        return z.reshape(B, Ln * self.hparams.n_groups, self.hparams.n_features)

    def _logits_all(self, z: Tensor) -> Tensor:
        """(B, L, H, D) -> (B, K, P, C) logits of every label set."""
        return probe_logits(self.features(z), self.newton.W)

    def forward(self, z: Tensor) -> Tensor:
        """Task logits (B, L, G, C) for activations z (B, L, H, D)."""
        hp = self.hparams
        out = self._logits_all(z)[:, 0]
        return out.reshape(len(z), hp.n_layers, hp.n_groups, -1)

    @torch.no_grad()
    def predict(self, z: Tensor) -> Tensor:
        """Every probe's prediction (B, L, G) for activations z (B, L, H, D): class ids, or values for ridge."""
        out = self(z)
        if self.hparams.loss == "ridge":
            return out[..., 0]
        return (out[..., 0] > 0).long() if out.shape[-1] == 1 else out.argmax(-1)

    def _labels(self, batch: dict) -> Tensor:
        return self.row_labels[:, batch["row"].cpu()].T.to(batch["z"].device)  # (B, K)

    def on_fit_start(self) -> None:
        self.newton.to(self.device)

    def on_test_start(self) -> None:
        self.newton.to(self.device)

    # --- training: one Newton step per epoch, or all of them when the epoch is one batch -----------------------
    def on_train_epoch_start(self) -> None:
        self._acc = None
        self._mm = None

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = self.features(batch["z"])
        y = self._labels(batch)
        if self.hparams.loss == "logistic":
            self._mass_mean_stats(batch["z"], y[:, 0])
        self._n = self._n + len(x) if batch_idx else len(x)
        # An epoch of one batch (the whole split in memory) takes every Newton step on it: the data is already here,
        # and worth one copy in probe-major order.
        whole = self.trainer.num_training_batches == 1
        xp = x.transpose(0, 1).contiguous() if whole else x.transpose(0, 1)  # (P, B, F)
        while True:
            stats = newton_stats(xp, y, self.newton.W, self.hparams.loss, probes=self.newton.active,
                                 n_hessian=self.newton.n_hessian)
            self._acc = stats if self._acc is None else tuple(a + b for a, b in zip(self._acc, stats))
            if not self.trainer.is_last_batch:
                return
            stop = self._newton_step()
            if stop or not whole:
                break
        self.log("train/grad_max", self.newton.grad_max, prog_bar=True)  # once per epoch: logging costs ~1 ms
        self.log("train/objective", float(self.newton.obj_prev[0].mean()) / self._n_all)
        self.log("train/newton_steps", float(self.newton.steps))
        self.log("train/active_probes", float(len(self.newton.active)))

    def _newton_step(self) -> bool:
        """The step from this epoch's sums (under DDP, summed over all ranks' rows); True when training stops."""
        if self._mm is not None:
            self._mm = self._sum_over_ranks(self._mm)
            self._finish_mass_mean()
            self._mm = None
        acc, self._acc = self._sum_over_ranks(self._acc), None
        self._n_all = int(self._sum_over_ranks(self._n))
        done = self.newton.update(*acc, l2=self.hparams.l2, n=self._n_all, tol=self.hparams.tol)
        if done or self.newton.steps >= self.hparams.max_steps:
            self.trainer.should_stop = True
            return True
        return False

    def _mass_mean_stats(self, z: Tensor, y: Tensor) -> None:
        pos = (y == 1).to(z.dtype)
        sums = (torch.stack([pos, 1 - pos]) @ z.flatten(1)).double().view(2, *z.shape[1:])  # one pass over z
        s = (sums[0], sums[1], pos.double().sum(), (1 - pos).double().sum())
        self._mm = s if self._mm is None else tuple(a + b for a, b in zip(self._mm, s))

    def _finish_mass_mean(self) -> None:
        if self._mm is None:
            return
        s1, s0, n1, n0 = self._mm
        m1, m0 = s1 / n1.clamp_min(1), s0 / n0.clamp_min(1)
        diff = m1 - m0
        direction = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (L, H, D)
        mid = ((m1 + m0) / 2 * direction).sum(-1)  # (L, H) decision threshold on the projection
        self.mass_mean = {"direction": direction, "threshold": mid}

    def configure_optimizers(self):
        return None

    # --- evaluation --------------------------------------------------------------------------------------------
    def _collect(self, batch: dict) -> dict:
        z = batch["z"]
        entry = {"logits": self._logits_all(z).cpu(), "y": self._labels(batch).cpu(), "row": batch["row"].cpu()}
        if self.mass_mean is not None:
            proj = torch.einsum("nlhd,lhd->nlh", z, self.mass_mean["direction"].to(z.dtype))
            entry["proj"] = (proj.double() - self.mass_mean["threshold"]).cpu()
        return entry

    def _evaluate(self, split: str, outs: list[dict]) -> None:
        hp = self.hparams
        logits = torch.cat([o["logits"] for o in outs])  # (N, K, P, C)
        y = torch.cat([o["y"] for o in outs])  # (N, K)
        N, K, P, C = logits.shape
        flat = logits.reshape(N, K * P, C)
        yy = y[:, :, None].expand(N, K, P).reshape(N, K * P)
        if hp.loss != "ridge":
            yy = yy.long()
        metrics = probe_metrics(flat, yy, hp.loss)
        shape = (K, hp.n_layers, hp.n_groups)
        table = {name: v.reshape(shape).numpy() for name, v in metrics.items()}
        if "proj" in outs[0]:
            proj = torch.cat([o["proj"] for o in outs])  # (N, L, H)
            table["mass_mean_acc"] = ((proj > 0).long() == y[:, 0, None, None].long()).double().mean(0).numpy()[None]
        self.tables[split] = table
        key = "acc" if "acc" in table else "r2"
        task = table[key][0]
        summary = {f"{split}/{key}_max": float(task.max()), f"{split}/{key}_mean": float(task.mean()),
                   f"{split}/loss_mean": float(table["loss"][0].mean())}
        for i, c in enumerate(self.fitted_controls, start=1):
            summary[f"{split}/selectivity_{c}_max"] = float((task - table[key][i]).max())
            summary[f"{split}/{key}_{c}_mean"] = float(table[key][i].mean())
        top = np.argsort(-task.ravel(), kind="stable")[: hp.top_k]
        correct = (predictions(flat[:, :P], hp.loss) == yy[:, :P]).double().numpy() if hp.loss != "ridge" else None
        if correct is not None:
            lo, hi = bootstrap_ci(correct[:, top], hp.n_boot, seed=hp.seed)
            self.tables[f"{split}_top"] = {"index": top, "acc": task.ravel()[top], "lo": lo, "hi": hi}
        self.summary.update(summary)
        self.log_dict(summary)

    # --- checkpoint protocol (train.callbacks) --------------------------------------------------------------------
    def head_scores(self) -> dict[str, np.ndarray]:
        """(L, G) maps for the heatmap and the per-head table: task metrics, and selectivity per control."""
        out = {}
        for split, table in self.tables.items():
            if split.endswith("_top"):
                continue
            for name, v in table.items():
                out[f"{split}/{name}"] = v[0]
                for i, c in enumerate(self.fitted_controls, start=1):
                    if name in ("acc", "r2") and v.shape[0] > i:
                        out[f"{split}/{name}_{c}"] = v[i]
                        out[f"{split}/selectivity_{c}"] = v[0] - v[i]
        return out

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        hp = self.hparams
        W = self.newton.W[0].float()  # (P, F + 1, C)
        C = W.shape[-1]
        out = {"weight": W[:, :-1].reshape(hp.n_layers, hp.n_groups, hp.n_features, C).contiguous(),
               "bias": W[:, -1].reshape(hp.n_layers, hp.n_groups, C).contiguous()}
        if self.mass_mean is not None:
            out["mass_mean"] = self.mass_mean["direction"].float()
            out["mass_mean_threshold"] = self.mass_mean["threshold"].float()
        return out

    def checkpoint_config(self, meta=None) -> CheckpointConfig:
        """Provenance and hyperparameters; ``controls`` lists the controls fitted (their metrics are in metrics.json,
        the checkpoint holds the task's weights only) and ``controls_skipped`` any skipped, with why."""
        meta = meta or self.meta
        hparams = init_hparams(self)
        hparams["controls"] = list(self.fitted_controls)
        if self.controls_skipped:
            hparams["controls_skipped"] = dict(self.controls_skipped)
        cfg = CheckpointConfig.from_store(meta, type(self).__name__, hparams, heads=self.heads)
        cfg.layers = list(self.layers)
        return cfg

    def checkpoint_metrics(self) -> dict:
        """Summary metrics, the tables (arrays (K, L, G) in label-set order: task, then the fitted controls), and
        ``controls_skipped`` (control -> why) when a control could not be fitted."""
        out = dict(self.summary)
        for split, table in self.tables.items():
            out[split] = {k: np.asarray(v).tolist() for k, v in table.items()}
        if self.controls_skipped:
            out["controls_skipped"] = dict(self.controls_skipped)
        return out

    @classmethod
    def from_checkpoint(cls, config: CheckpointConfig, tensors: dict[str, Tensor]) -> "LinearProbes":
        """The task probes for inference: the checkpoint holds no control weights, whatever ``controls`` lists."""
        hp = {k: v for k, v in config.hparams.items() if k != "controls_skipped"}
        module = cls(**{**hp, "controls": []})
        Ln, G, Fd, C = tensors["weight"].shape
        W = torch.cat([tensors["weight"], tensors["bias"][:, :, None]], 2).reshape(1, Ln * G, Fd + 1, C)
        module.newton.W = W.to(getattr(torch, hp["dtype"]))
        if "mass_mean" in tensors:
            module.mass_mean = {"direction": tensors["mass_mean"].double(),
                                "threshold": tensors["mass_mean_threshold"].double()}
        module.layers, module.heads = list(config.layers), config.heads
        return module.eval()

    # --- exact resume: solver state and RNG in Lightning's checkpoint --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["newton"] = self.newton.state_dict()
        checkpoint["torch_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        labels = self.row_labels  # set by setup() from the data, before a resume restores the rest
        self.hparams.update(checkpoint["hyper_parameters"])
        self._build()
        self.row_labels = labels
        self.newton.load_state_dict(checkpoint["newton"])
        torch.set_rng_state(checkpoint["torch_rng"])
