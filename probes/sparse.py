"""Sparse probes over all heads at once: L1, elastic net and group lasso (one group per head), and k-sparse probing.

:class:`SparseProbe` is one linear probe on the concatenated z of every stored (layer, head), on standardised
features, with the penalty applied by proximal gradient steps (FISTA on full batches, float32, with the adaptive
momentum restart of O'Donoghue & Candes), so dropped weights and heads are exactly zero::

    mean_n loss(x_n . w + b, y_n) + alpha * penalty(w)
    l1:           ||w||_1
    elastic_net:  l1_ratio ||w||_1 + (1 - l1_ratio) / 2 ||w||^2
    group_lasso:  sum_heads sqrt(D C) ||w_head||_2              (a head is in or out: the probe selects heads)

The step size is 1 / Lipschitz constant of the mean loss, from a power iteration on the first batch. The saved
weights act on raw activations (the standardisation is folded in); ``group_norm`` (L, H) ranks heads.

:func:`ksparse_sweep` is k-sparse probing (Gurnee et al. 2023): per head, rank dimensions by the absolute
difference of class means on the train split, and fit the batched Newton probe on the top k, for each k.
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch import Tensor

from headprobe import InputError
from headprobe.probes.checkpoint import CheckpointConfig, init_hparams, register
from headprobe.probes.hub import FromPretrained
from headprobe.probes.metrics import probe_metrics
from headprobe.probes.newton import fit_newton, loss_terms
from headprobe.probes.probe_eval import SplitEval

PENALTIES = ("l1", "elastic_net", "group_lasso")


def group_norms(weights: Tensor | np.ndarray) -> Tensor:
    """L2 norm of each head's weight group: (L, H, D[, C]) -> (L, H), in the weights' dtype (float64 for arrays)."""
    w = torch.as_tensor(weights) if isinstance(weights, Tensor) else torch.as_tensor(weights, dtype=torch.float64)
    return w.flatten(2).norm(dim=2)


def prox(W: Tensor, penalty: str, thresh: float, l1_ratio: float = 0.5) -> Tensor:
    """Proximal operator of ``thresh * penalty`` on W (L, H, D, C) (standardised scale)."""
    if penalty == "l1":
        return W.sign() * (W.abs() - thresh).clamp_min(0)
    if penalty == "elastic_net":
        return W.sign() * (W.abs() - thresh * l1_ratio).clamp_min(0) / (1 + thresh * (1 - l1_ratio))
    size = W.shape[2] * W.shape[3]
    norm = W.pow(2).sum((2, 3), keepdim=True).sqrt()
    return W * (1 - thresh * math.sqrt(size) / norm.clamp_min(1e-30)).clamp_min(0)


@register
class SparseProbe(SplitEval, FromPretrained, L.LightningModule):
    """One sparse linear probe over every stored head.

    Args:
        penalty: "l1", "elastic_net" or "group_lasso".
        alpha: penalty strength (on the mean loss); l1_ratio: elastic net mix.
        loss: "auto", "logistic", "softmax" or "ridge".
        lr: step size; 0 picks 1 / Lipschitz constant of the first batch.
        inner_steps: proximal steps per batch (full-batch training: many steps per epoch).
        momentum: FISTA acceleration (use it with full batches; stochastic minibatches want False).
        tol: stop when no weight moved more than tol (relative) in an epoch.
        n_layers, n_heads, d_head, n_classes: the weight shape; filled from the data at setup.
    """

    def __init__(self, penalty: str = "group_lasso", alpha: float = 0.01, l1_ratio: float = 0.5, loss: str = "auto",
                 lr: float = 0.0, inner_steps: int = 1, momentum: bool = True, tol: float = 1e-6,
                 n_layers: int = 0, n_heads: int = 0, d_head: int = 0, n_classes: int = 0):
        super().__init__()
        if penalty not in PENALTIES:
            raise InputError(f"--model.penalty {penalty!r}: choose one of {', '.join(PENALTIES)}")
        if not alpha > 0 or not 0 <= l1_ratio <= 1:
            raise InputError(f"--model.alpha {alpha}, --model.l1_ratio {l1_ratio}: alpha must be above 0 and l1_ratio "
                             f"within 0..1")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.meta, self.layers, self.heads = None, None, None
        self.tables: dict[str, dict[str, np.ndarray]] = {}
        self.summary: dict[str, float] = {}
        self._outputs: dict[str, list] = {}
        self._saved_norm: Tensor | None = None  # group norms of a probe loaded from a checkpoint
        if n_layers:
            self._build()

    def _build(self) -> None:
        hp = self.hparams
        C = hp.n_classes if hp.loss == "softmax" else 1
        shape = (hp.n_layers, hp.n_heads, hp.d_head)
        for name, value in {"W": torch.zeros(*shape, C), "b": torch.zeros(C), "V": torch.zeros(*shape, C),
                            "Vb": torch.zeros(C), "t": torch.ones(()), "step_size": torch.tensor(float(hp.lr)),
                            "mean": torch.zeros(shape), "std": torch.ones(shape)}.items():
            self.register_buffer(name, value.float())

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        hp = self.hparams
        loss, C = self._bind(dm)
        shape = dict(loss=loss, n_layers=dm.n_layers, n_heads=dm.n_heads, d_head=dm.meta.d_head,
                     n_classes=C if C > 1 else (1 if loss == "ridge" else 2))
        if not hp.n_layers or any(hp[k] != v for k, v in shape.items()):
            hp.update(shape)
            self._build()
        if stage == "fit":  # (a resumed run's checkpoint then restores its own)
            self._saved_norm = None  # the weights will change: norms come from them again
            mean, std = dm.feature_stats()
            self.mean.copy_(torch.from_numpy(mean))
            self.std.copy_(torch.from_numpy(std).clamp_min(1e-8))

    # --- forward ------------------------------------------------------------------------------------------------
    def _std(self, z: Tensor) -> Tensor:
        return (z.float() - self.mean) / self.std

    def _eta(self, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """(N, L, H, D) x (L, H, D, C) -> (N, C): one matmul over the flattened heads (einsum copies x: ~8x slower)."""
        return x.flatten(1) @ W.flatten(0, 2) + b

    def forward(self, z: Tensor) -> Tensor:
        """Logits (B, C) for activations z (B, L, H, D)."""
        return self._eta(self._std(z), self.W, self.b)

    # --- training -----------------------------------------------------------------------------------------------
    def _grad(self, x: Tensor, y: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        eta = self._eta(x, W, b)
        _, r, _ = loss_terms(eta, y.to(eta.dtype), self.hparams.loss)  # r (B, C)
        return (r.T @ x.flatten(1)).T.reshape(W.shape) / len(x), r.mean(0)

    def _lipschitz(self, x: Tensor) -> float:
        """Largest eigenvalue of [x, 1]^T [x, 1] / B (power iteration) times the loss's curvature bound."""
        xa = torch.cat([x.flatten(1), torch.ones(len(x), 1, dtype=x.dtype)], 1)
        v = torch.ones(xa.shape[1], dtype=x.dtype)
        for _ in range(50):
            v = xa.T @ (xa @ v)
            v = v / v.norm()
        lam = float(v @ (xa.T @ (xa @ v))) / len(x)
        return lam * {"logistic": 0.25, "softmax": 0.5, "ridge": 1.0}[self.hparams.loss]

    def on_train_epoch_start(self) -> None:
        self._start = self.W.clone()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        x, y = self._std(batch["z"]), batch["label"]
        if float(self.step_size) == 0:  # DDP: the ranks' mean bound, which bounds the pooled batch's (convexity)
            lipschitz = self._sum_over_ranks(torch.tensor(self._lipschitz(x), dtype=torch.float64))
            self.step_size.fill_(self.trainer.world_size / float(lipschitz))
        lr = float(self.step_size)
        for _ in range(hp.inner_steps):
            point_W, point_b = (self.V, self.Vb) if hp.momentum else (self.W, self.b)
            gW, gb = self._grad(x, y, point_W, point_b)
            if self.trainer.world_size > 1:  # DDP: the gradient of all ranks' (equal-sized) batches
                gW, gb = (g / self.trainer.world_size for g in self._sum_over_ranks((gW, gb)))
            W_new = prox(point_W - lr * gW, hp.penalty, lr * hp.alpha, hp.l1_ratio)
            b_new = point_b - lr * gb
            if hp.momentum and float(((point_W - W_new) * (W_new - self.W)).sum()
                                     + ((point_b - b_new) * (b_new - self.b)).sum()) > 0:
                self.t.fill_(1.0)  # adaptive restart: momentum points uphill, drop it (O'Donoghue & Candes 2015)
            if hp.momentum:
                t_new = (1 + math.sqrt(1 + 4 * float(self.t) ** 2)) / 2
                beta = (float(self.t) - 1) / t_new
                self.V.copy_(W_new + beta * (W_new - self.W))
                self.Vb.copy_(b_new + beta * (b_new - self.b))
                self.t.fill_(t_new)
            self.W.copy_(W_new)
            self.b.copy_(b_new)

    def on_train_epoch_end(self) -> None:
        change = float((self.W - self._start).abs().max() / self.W.abs().max().clamp_min(1e-12))
        self.log("train/rel_change", change)
        self.log("train/heads_selected", float((self.group_norm() > 0).sum()))
        if change < self.hparams.tol:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return None

    def group_norm(self) -> Tensor:
        """(L, H) norm of each head's weights on the standardised scale (0: the head was dropped)."""
        if self._saved_norm is not None:  # loaded: W is on the raw scale
            return self._saved_norm
        return group_norms(self.W)

    # --- evaluation ---------------------------------------------------------------------------------------------
    def _collect(self, batch: dict) -> tuple[Tensor, Tensor]:
        return self(batch["z"]).cpu(), batch["label"].cpu()

    def _evaluate(self, split: str, outs: list) -> None:
        logits = torch.cat([o[0] for o in outs])[:, None]  # (N, 1, C)
        y = torch.cat([o[1] for o in outs])[:, None]
        metrics = {f"{split}/{k}": float(v[0]) for k, v in probe_metrics(logits, y, self.hparams.loss).items()}
        metrics[f"{split}/heads_selected"] = float((self.group_norm() > 0).sum())
        self.summary.update(metrics)
        self.log_dict(metrics)

    # --- checkpoint protocol (train.callbacks) --------------------------------------------------------------------
    def head_scores(self) -> dict[str, np.ndarray]:
        return {"group_norm": self.group_norm().cpu().numpy()}

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Weights on raw activations: w / std, b - sum(w mean / std)."""
        W_raw = self.W / self.std[..., None]
        b_raw = self.b - torch.einsum("lhdc,lhd->c", W_raw, self.mean)
        return {"weight": W_raw.float(), "bias": b_raw.float(), "group_norm": self.group_norm().float()}

    def checkpoint_config(self, meta=None) -> CheckpointConfig:
        cfg = CheckpointConfig.from_store(meta or self.meta, type(self).__name__, init_hparams(self), heads=self.heads,
                                          normalisation={"standardised": True, "folded": True})
        cfg.layers = list(self.layers)
        return cfg

    def checkpoint_metrics(self) -> dict:
        """Summary metrics, the (L, H) group norms, and the selected heads as model [layer, head] numbers, largest
        norm first."""
        norms = self.group_norm().cpu().numpy()
        H = norms.shape[1]
        heads = list(self.heads) if self.heads is not None else list(range(H))
        order = np.argsort(-norms.ravel(), kind="stable")
        selected = [[int(self.layers[i // H]), int(heads[i % H])] for i in order if norms.ravel()[i] > 0]
        return {**self.summary, "selected_heads": selected, "group_norm": norms.tolist()}

    @classmethod
    def from_checkpoint(cls, config: CheckpointConfig, tensors: dict[str, Tensor]) -> "SparseProbe":
        """A probe on raw activations (the standardisation is folded into the weights); its group norms are the
        saved ones, on the standardised scale the probe was trained on."""
        module = cls(**config.hparams)
        module.W.copy_(tensors["weight"])
        module.b.copy_(tensors["bias"])
        module._saved_norm = tensors["group_norm"].float()
        module.layers, module.heads = list(config.layers), config.heads
        return module.eval()


def ksparse_sweep(x: Tensor, y: Tensor, train: Tensor, val: Tensor, ks: list[int], l2: float = 1.0
                  ) -> dict[int, dict[str, Tensor]]:
    """k-sparse probes per head for binary labels: {k: {"index" (P, k), "W" (P, k + 1), "val_acc" (P,)}}.

    x (N, P, D) activations of P heads, y (N,) 0/1 labels, train / val row masks (N,) bool."""
    xt, yt = x[train].double(), y[train].double()
    diff = (xt[yt == 1].mean(0) - xt[yt == 0].mean(0)).abs()  # (P, D)
    order = diff.argsort(dim=-1, descending=True)
    out = {}
    for k in ks:
        idx = order[:, :k]  # (P, k)
        pick = lambda rows: torch.gather(x[rows], 2, idx[None].expand(int(rows.sum()), -1, -1))
        W, _ = fit_newton(pick(train), yt[:, None], "logistic", l2=l2)
        W = W[0, :, :, 0]  # (P, k + 1)
        logits = torch.einsum("npk,pk->np", pick(val).double(), W[:, :-1]) + W[:, -1]
        acc = ((logits > 0).long() == y[val, None].long()).double().mean(0)
        out[k] = {"index": idx, "W": W, "val_acc": acc}
    return out
