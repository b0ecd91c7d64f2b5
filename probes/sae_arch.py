"""The architectures of :class:`headprobe.probes.sae.SparseAutoencoder`, one small object each, registered by name.

An architecture says how pre-activations ``pre`` (B, n) become latents ``f`` (B, n) at training time (the function
it trains through, with its sparsity term) and at inference, which option holds its sparsity coefficient (warmed up
linearly), which extra parameters it owns and which inference threshold it keeps, if any. The module calls them and
never branches on the name; a new architecture is a subclass decorated with :func:`register_architecture`.

    relu       f = ReLU(pre); sparsity term sum_i f_i ||W_dec[i]|| (L1 weighted by decoder norms), ``l1_coeff``
    topk       the k largest pre-activations per row, ReLU'd; the fused sparse kernel; AuxK on dead latents
    batchtopk  the B*k largest over the batch in training; at inference pre * (pre > threshold), the threshold a
               running average of the smallest kept activation (probes/sae_plan.py: threshold_rate); AuxK
    jumprelu   f = pre * H(pre - theta), theta = exp(log_theta) learned; sparsity term L0 through a straight-through
               step (Rajamanoharan et al. 2024), ``l0_coeff``
    matryoshka BatchTopK whose loss is the mean FVU of nested prefixes of the latents (widths
               ``matryoshka_prefixes`` x d_sae, then all; Bussmann et al. 2025, arXiv 2503.17547), so the first
               latents reconstruct alone and general features are not absorbed into specific ones

topk, batchtopk and matryoshka train through the fused sparse kernel (probes/sae_kernels.py; ``fused=False``: the
dense reference).

Every method that takes ``sae`` reads its tensors (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``log_theta``,
``threshold``) and its hyperparameters ``sae.hparams``; pre-activations come from ``sae.pre(x)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from headprobe.probes.sae_kernels import JumpReLU as JumpReLUFunction
from headprobe.probes.sae_kernels import Step, select_sorted, topk_sae
from headprobe.probes.sae_plan import threshold_rate

ARCHITECTURES: dict[str, type["Architecture"]] = {}


def register_architecture(cls: type["Architecture"]) -> type["Architecture"]:
    """Class decorator: make ``cls`` available as ``SparseAutoencoder(architecture=cls.name)``."""
    ARCHITECTURES[cls.name] = cls
    return cls


@dataclass
class TrainPass:
    """What one training forward pass gives the loss.

    x_hat (B, d_in) reconstruction of the normalised inputs; fired (n,) bool, latents active on the batch; l0 ()
    mean active latents per row; penalty () the sparsity term before its coefficient (None: none); aux_hat (B, d_in)
    the dead latents' reconstruction of the residual for AuxK (None: no dead latents or no AuxK); recon () the
    reconstruction loss where it is not the FVU of x_hat (Matryoshka's mean over prefixes).
    """

    x_hat: Tensor
    fired: Tensor
    l0: Tensor
    penalty: Tensor | None = None
    aux_hat: Tensor | None = None
    recon: Tensor | None = None


def fvu_of(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained on one batch, x and x_hat (B, d): the loss of every architecture."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class Architecture:
    """Base class: dense training through :meth:`train_activate`, decoding by a dense product."""

    name: ClassVar[str] = ""
    coeff_option: ClassVar[str | None] = None  # hyperparameter holding the sparsity coefficient
    uses_k: ClassVar[bool] = False  # reads ``k`` (checked against d_in and d_sae)
    auxk: ClassVar[bool] = False  # trains dead latents with AuxK

    def extra_parameters(self, n: int, hp) -> dict[str, Tensor]:
        """Initial values of the architecture's own trainable tensors, by name (saved in checkpoints)."""
        return {}

    def train_activate(self, sae, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Training latents (B, n) and the sparsity term () or None, with the gradients training follows."""
        raise NotImplementedError

    def latents(self, sae, pre: Tensor) -> Tensor:
        """Inference latents (B, n): by default the pre-activations above the inference threshold."""
        return pre * (pre > self.threshold(sae))

    def threshold(self, sae) -> Tensor | None:
        """The inference threshold (() or (n,)) on pre-activations, if the architecture has one."""
        return None

    def coefficient(self, hp, step: int, warmup: int) -> float:
        """The sparsity coefficient at optimizer step ``step``: linear warm-up over ``warmup`` steps (0: none)."""
        if self.coeff_option is None:
            return 0.0
        coeff = hp[self.coeff_option]
        return coeff * min(1.0, (step + 1) / warmup) if warmup else coeff

    def train_pass(self, sae, x: Tensor, dead: Tensor | None) -> TrainPass:
        """The training forward pass on normalised inputs x (B, d_in); ``dead`` (m,) latent indices for AuxK."""
        return self.dense_pass(sae, x, dead)[0]

    def dense_pass(self, sae, x: Tensor, dead: Tensor | None) -> tuple[TrainPass, Tensor]:
        """:meth:`train_pass` by dense products, and the training latents f (B, n)."""
        pre = sae.pre(x)
        f, penalty = self.train_activate(sae, pre)
        x_hat = f @ sae.W_dec + sae.b_dec
        active = f > 0
        aux_hat = dense_auxk(sae, pre, dead) if dead is not None and len(dead) else None
        return TrainPass(x_hat, active.any(0), active.sum(1).float().mean(), penalty, aux_hat), f

    def reconstruct(self, sae, xs: Tensor) -> Tensor:
        """Inference reconstruction (B, d_in) of normalised inputs xs (B, d_in), still normalised."""
        return torch.addmm(sae.b_dec, self.latents(sae, sae.pre(xs)), sae.W_dec)


def dense_auxk(sae, pre: Tensor, dead: Tensor) -> Tensor:
    """AuxK's reconstruction (B, d_in), without b_dec, from the k_aux largest ReLU'd pre-activations (B, n) among the
    ``dead`` latents (m,); all of them, in ``dead``'s order, when k_aux >= m. The fused kernel's result, densely."""
    k_aux = sae.hparams.k_aux or sae.d_in // 2
    pre_dead = pre.index_select(1, dead).relu()  # (B, m)
    if k_aux >= len(dead):
        return pre_dead @ sae.W_dec[dead]
    vals, j = pre_dead.topk(k_aux, dim=1)
    return F.embedding_bag(dead[j], sae.W_dec, per_sample_weights=vals, mode="sum")


def fused_pass(sae, x: Tensor, dead: Tensor | None, batch: bool) -> tuple[TrainPass, Tensor, Tensor]:
    """The training pass through the fused kernel (per-row TopK, or BatchTopK's selection when ``batch``) and the
    selected codes: vals, idx (B, m), zero values where not kept."""
    hp = sae.hparams
    x_hat, vals, idx, aux_hat, _, aux_idx = topk_sae(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, hp.k, dead,
                                                     hp.k_aux or sae.d_in // 2, batch)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    fired[idx[vals > 0]] = True
    out = TrainPass(x_hat, fired, (vals > 0).sum(1).float().mean(), aux_hat=aux_hat if aux_idx.shape[1] else None)
    return out, vals, idx


@register_architecture
class ReLU(Architecture):
    name = "relu"
    coeff_option = "l1_coeff"

    def train_activate(self, sae, pre: Tensor) -> tuple[Tensor, Tensor]:
        f = pre.relu()
        return f, (f * sae.W_dec.norm(dim=1)).sum(1).mean()

    def latents(self, sae, pre: Tensor) -> Tensor:
        return pre.relu()


@register_architecture
class TopK(Architecture):
    name = "topk"
    uses_k = True
    auxk = True

    def train_activate(self, sae, pre: Tensor) -> tuple[Tensor, None]:  # the unfused path: the kernel's reference
        vals, idx = select_sorted(pre, sae.hparams.k)
        return torch.zeros_like(pre).scatter(1, idx, vals), None

    def latents(self, sae, pre: Tensor) -> Tensor:
        vals, idx = select_sorted(pre, sae.hparams.k)
        return torch.zeros_like(pre).scatter_(1, idx, vals)

    def train_pass(self, sae, x: Tensor, dead: Tensor | None) -> TrainPass:
        return fused_pass(sae, x, dead, False)[0] if sae.hparams.fused else super().train_pass(sae, x, dead)

    def reconstruct(self, sae, xs: Tensor) -> Tensor:
        return topk_sae(xs, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.hparams.k)[0]


@register_architecture
class BatchTopK(Architecture):
    name = "batchtopk"
    uses_k = True
    auxk = True

    def train_activate(self, sae, pre: Tensor) -> tuple[Tensor, None]:
        act = pre.relu()
        flat = act.flatten()
        vals, pos = flat.topk(min(sae.hparams.k * len(pre), flat.numel()), sorted=False)
        kept = vals[vals > 0]
        if len(kept):
            self.update_threshold(sae, kept.min().detach())
        return torch.zeros_like(flat).scatter(0, pos, vals).view_as(act), None

    def train_pass(self, sae, x: Tensor, dead: Tensor | None) -> TrainPass:
        return self.codes_pass(sae, x, dead)[0]

    def codes_pass(self, sae, x: Tensor, dead: Tensor | None) -> tuple[TrainPass, Tensor, Tensor | None]:
        """The training pass and its codes: fused, (vals, idx) (B, m); dense (fused=False), (f (B, n), None)."""
        if not sae.hparams.fused:
            return *self.dense_pass(sae, x, dead), None
        out, vals, idx = fused_pass(sae, x, dead, True)
        kept = vals[vals > 0]
        if len(kept):
            self.update_threshold(sae, kept.min().detach())
        return out, vals, idx

    def update_threshold(self, sae, smallest: Tensor) -> None:
        """Move the inference threshold towards this batch's smallest kept activation (a running average)."""
        rate = threshold_rate(sae.global_step, sae.plan.threshold_momentum)
        sae.threshold.lerp_(smallest.to(sae.threshold.dtype), rate)

    def threshold(self, sae) -> Tensor:
        return sae.threshold  # a buffer: ()


@register_architecture
class JumpReLU(Architecture):
    name = "jumprelu"
    coeff_option = "l0_coeff"

    def extra_parameters(self, n: int, hp) -> dict[str, Tensor]:
        return {"log_theta": torch.full((n,), math.log(hp.jumprelu_theta))}

    def train_activate(self, sae, pre: Tensor) -> tuple[Tensor, Tensor]:
        theta, eps = sae.log_theta.exp(), sae.hparams.jumprelu_eps
        return JumpReLUFunction.apply(pre, theta, eps), Step.apply(pre, theta, eps).sum(1).mean()

    def threshold(self, sae) -> Tensor:
        return sae.log_theta.exp()  # learned: (n,)


@register_architecture
class Matryoshka(BatchTopK):
    name = "matryoshka"

    def widths(self, sae) -> list[int]:
        """The nested prefix widths, ascending, the last all d_sae latents."""
        n = sae.d_sae
        return sorted({min(n, max(1, round(frac * n))) for frac in sae.hparams.matryoshka_prefixes} | {n})

    def train_pass(self, sae, x: Tensor, dead: Tensor | None) -> TrainPass:
        out, codes, idx = self.codes_pass(sae, x, dead)
        hats = []
        for m in self.widths(sae)[:-1]:
            if idx is None:  # dense reference: codes are f (B, n)
                hats.append(codes[:, :m] @ sae.W_dec[:m] + sae.b_dec)
            else:
                hats.append(F.embedding_bag(idx, sae.W_dec, per_sample_weights=codes * (idx < m), mode="sum")
                            + sae.b_dec)
        out.recon = torch.stack([fvu_of(x, h) for h in [*hats, out.x_hat]]).mean()
        return out
