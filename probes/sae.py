"""Sparse autoencoders on per-head outputs (Kissane et al. 2024): one layer's heads concatenated, one head, or
several layers, as one LightningModule with four architectures.

Shapes: ``x`` (B, d_in) with d_in = layers x heads x d_head, flattened from a store batch ``z`` (B, L, H, D)
in (layer, head, d_head) order; latents ``f`` (B, d_sae); ``W_enc``, ``W_dec`` (d_sae, d_in), so one row of
``W_dec`` is one latent's direction and decoding is a gather.

Architectures (``architecture=``):
    relu       f = ReLU(W_enc (x - b_dec) + b_enc), loss FVU + l1_coeff * sum_i f_i ||W_dec[i]||
    topk       the k largest pre-activations (ReLU'd); fused sparse forward/backward; AuxK on dead latents
    batchtopk  the B*k largest over the batch; a threshold (EMA of the smallest kept value) is used at inference
    jumprelu   f = pre * H(pre - theta), loss FVU + l0_coeff * L0 with straight-through gradients for theta

Practices, all options of :class:`SparseAutoencoder` and all logged as hyperparameters:
    input_norm="expected_norm"   inputs multiplied by c = sqrt(d_in / E||x||^2) during training; c is folded into
                                 the weights on export, so a saved SAE works on raw activations
    b_dec_init="geometric_median" | "mean" | "zeros"    from a sample of the training data
    decoder_norm="unit"          unit-norm decoder rows, gradient parallel to them removed before each step;
                                 "penalty": free norms (ReLU's L1 is weighted by them)
    warmup_steps, decay_start    linear LR warmup, then linear decay to 0 over the last (1 - decay_start) of training
    sparsity_warmup_steps        linear warmup of l1_coeff / l0_coeff
    dead_after_tokens            a latent that has not fired for this many tokens is dead (AuxK trains it)
The reconstruction loss of every architecture is the batch FVU, sum((x - x_hat)^2) / sum((x - mean)^2).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headprobe import InputError
from headprobe.probes.checkpoint import CheckpointConfig, init_hparams, register, save_checkpoint

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


# --- sparse kernels ------------------------------------------------------------------------------------------
def _row_dots(idx: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """out[b, j] = a[b] . w[idx[b, j]] without materialising w[idx]; idx (B, k) sorted per row -> (B, k)."""
    B, k = idx.shape
    if k == 0:
        return a.new_zeros(B, 0)
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is all we use
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), a.new_zeros(B * k), (B, w.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, a, w.T).values().view(B, k)


def _scatter_rows(idx: Tensor, coef: Tensor, rows: Tensor, n: int) -> Tensor:
    """out[i] = sum over (b, j) with idx[b, j] == i of coef[b, j] * rows[b]: S^T @ rows for a k-sparse S.

    idx, coef (B, k); rows (B, d) -> (n, d). A sparse COO product: touches B * k * d values, not B * n * d.
    """
    B, k = idx.shape
    owner = torch.arange(B, device=idx.device).repeat_interleave(k)
    S = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), owner]), coef.reshape(-1), (n, B),
                                check_invariants=False)
    return torch.sparse.mm(S, rows)


def _select_sorted(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row, ReLU'd, with column indices sorted ascending: (B, k), (B, k)."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1)
    return vals.gather(1, order).relu_(), idx


class TopKSAEFunction(torch.autograd.Function):
    """Fused TopK autoencoder: dense encode, top-k, gather decode; the backward touches only selected latents.

    forward(x (B, d_in), W_enc (n, d_in), b_enc (n,), W_dec (n, d_in), b_dec (d_in,), k, dead (m,) int64 or
    None, k_aux) -> x_hat (B, d_in), vals (B, k), idx (B, k), aux_hat (B, d_in), aux_vals (B, k_a), aux_idx.
    ``aux_hat`` decodes (without b_dec) the k_aux largest pre-activations among the ``dead`` latents.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc.T).to(x.dtype)  # (B, n): the only dense product (bf16 under autocast)
        vals, idx = _select_sorted(pre, k)
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
        k_a = min(k_aux, len(dead)) if dead is not None else 0
        if k_a > 0:
            aux_vals, j = _select_sorted(pre.index_select(1, dead), k_a)
            aux_idx, order = dead[j].sort(dim=1)
            aux_vals = aux_vals.gather(1, order)
            aux_hat = F.embedding_bag(aux_idx, W_dec, per_sample_weights=aux_vals, mode="sum")
        else:
            aux_vals, aux_idx, aux_hat = x.new_zeros(len(x), 0), idx.new_zeros(len(x), 0), torch.zeros_like(x)
        ctx.save_for_backward(x_c, W_enc, W_dec, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return x_hat, vals, idx, aux_hat, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_hat, g_vals, _g_idx, g_aux_hat, g_aux_vals, _g_aux_idx):
        x_c, W_enc, W_dec, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        n, B = W_dec.shape[0], len(x_c)
        g_hat = torch.zeros_like(x_c) if g_hat is None else g_hat
        g_aux_hat = torch.zeros_like(x_c) if g_aux_hat is None else g_aux_hat
        # dL/d(selected pre-activations): through the decoder, plus any direct use of the values; ReLU mask.
        g_main = _row_dots(idx, g_hat, W_dec) + (0 if g_vals is None else g_vals)
        g_main = g_main * (vals > 0)
        g_aux = _row_dots(aux_idx, g_aux_hat, W_dec) + (0 if g_aux_vals is None else g_aux_vals)
        g_aux = g_aux * (aux_vals > 0)
        all_idx, g_pre = torch.cat([idx, aux_idx], 1), torch.cat([g_main, g_aux], 1)  # (B, k + k_a)

        grad_x = grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = None
        need = ctx.needs_input_grad
        if need[1]:
            grad_W_enc = _scatter_rows(all_idx, g_pre, x_c, n)
        if need[2] or need[4]:
            grad_b_enc = torch.zeros(n, dtype=g_pre.dtype, device=g_pre.device).index_add_(
                0, all_idx.reshape(-1), g_pre.reshape(-1))
        if need[3]:
            grad_W_dec = _scatter_rows(idx, vals, g_hat, n)
            if aux_idx.shape[1]:
                grad_W_dec += _scatter_rows(aux_idx, aux_vals, g_aux_hat, n)
        if need[0] or need[4]:
            g_xc = (F.embedding_bag(all_idx, W_enc, per_sample_weights=g_pre, mode="sum") if need[0]
                    else None)
            if need[0]:
                grad_x = g_xc
            if need[4]:
                enc_part = g_xc.sum(0) if g_xc is not None else grad_b_enc @ W_enc
                grad_b_dec = g_hat.sum(0) - enc_part
        return grad_x, grad_W_enc, (grad_b_enc if need[2] else None), grad_W_dec, grad_b_dec, None, None, None


def topk_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
             dead: Tensor | None = None, k_aux: int = 0) -> tuple[Tensor, ...]:
    """Functional form of :class:`TopKSAEFunction` (see there for shapes)."""
    return TopKSAEFunction.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux)


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel: 1 on |u| < 1/2."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta); d f / d theta = -(theta / eps) K((pre - theta) / eps) (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.eps) * _rect((pre - theta) / ctx.eps) * g
        return g * (pre > theta), g_theta.sum(0), None


class Step(torch.autograd.Function):
    """H(pre - theta), for the L0 penalty; d/d theta = -(1 / eps) K((pre - theta) / eps), no gradient to pre."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * g).sum(0), None


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x (N, d)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


def fve(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance explained on one batch: 1 - sum((x - x_hat)^2) / sum((x - mean(x))^2)."""
    return 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


# --- the module ----------------------------------------------------------------------------------------------
@register
class SparseAutoencoder(L.LightningModule):
    """A sparse autoencoder on per-head outputs of the store's selected layers and heads.

    Args:
        architecture: "relu", "topk", "batchtopk" or "jumprelu".
        d_sae: number of latents; 0 means ``expansion * d_in``.
        expansion: latents per input dimension when ``d_sae`` is 0.
        d_in: input width; None infers layers x heads x d_head from the datamodule at setup.
        k: active latents per token (topk) or mean per token (batchtopk).
        l1_coeff: ReLU's L1 coefficient, on the FVU scale of the reconstruction loss.
        l0_coeff: JumpReLU's L0 coefficient.
        jumprelu_theta: initial JumpReLU threshold (on normalised inputs); jumprelu_eps: STE kernel width.
        auxk_alpha: weight of the AuxK loss (topk, batchtopk); k_aux: dead latents it uses (0: d_in // 2).
        dead_after_tokens: tokens without firing after which a latent counts as dead.
        dense_threshold: firing rate above which a latent counts as dense.
        b_dec_init: "geometric_median", "mean" or "zeros"; init_rows: training rows used for it and for the scale.
        input_norm: "expected_norm" (scale inputs to E||x||^2 = d_in) or "none".
        decoder_norm: "unit" (unit-norm rows, parallel gradient removed) or "penalty".
        lr, betas: Adam; lr 0 picks 4e-3 / sqrt(d_sae / 4096).
        warmup_steps: linear LR warmup; decay_start: fraction of training after which the LR decays linearly to 0.
        sparsity_warmup_steps: linear warmup of the sparsity coefficient.
        token_budget: stop after this many training tokens (0: the Trainer's max_steps / max_epochs decide).
        fused: TopK only: use the fused sparse kernel (False: dense autograd, for checks).
        batchtopk_momentum: EMA momentum of the BatchTopK inference threshold.
        seed: weight initialisation seed.
    """

    def __init__(self, architecture: str = "topk", d_sae: int = 0, expansion: int = 8, d_in: int | None = None,
                 k: int = 32, l1_coeff: float = 0.02, l0_coeff: float = 0.002, jumprelu_theta: float = 0.1,
                 jumprelu_eps: float = 0.05, auxk_alpha: float = 1 / 32, k_aux: int = 0,
                 dead_after_tokens: int = 200_000, dense_threshold: float = 0.1,
                 b_dec_init: str = "geometric_median", init_rows: int = 16384, input_norm: str = "expected_norm",
                 decoder_norm: str = "unit", lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 10, decay_start: float = 0.8, sparsity_warmup_steps: int = 0,
                 token_budget: int = 0, fused: bool = True, batchtopk_momentum: float = 0.99, seed: int = 0):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise InputError(f"unknown SAE architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if b_dec_init not in B_DEC_INITS:
            raise InputError(f"unknown b_dec_init {b_dec_init!r}: choose one of {', '.join(B_DEC_INITS)}")
        if input_norm not in ("expected_norm", "none"):
            raise InputError(f"unknown input_norm {input_norm!r}: choose expected_norm or none")
        if decoder_norm not in ("unit", "penalty"):
            raise InputError(f"unknown decoder_norm {decoder_norm!r}: choose unit or penalty")
        if not 0 < decay_start <= 1:
            raise InputError(f"decay_start must lie in (0, 1], got {decay_start}")
        self.save_hyperparameters()
        self.layers: list[int] | None = None  # model layers read (provenance, set at setup or load)
        self.heads: list[int] | None = None
        self.n_heads_in: int | None = None  # heads per layer in the input
        self.meta = None  # StoreMeta of the training data
        self.initialised = False
        if d_in is not None:
            self._build(d_in)

    # --- construction ------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def _build(self, d_in: int) -> None:
        hp = self.hparams
        hp.d_in = d_in
        n = hp.d_sae or hp.expansion * d_in
        need, ram = 32 * n * d_in / 2**30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        if need > ram:  # encoder and decoder in float32, each with a gradient and two Adam moments
            raise InputError(f"an SAE of {n} latents on {d_in} inputs needs ~{need:.0f} GB for its weights, gradients "
                             f"and Adam state, more than this machine's {ram:.0f} GB: train on fewer layers "
                             f"(--data.layers) or set a smaller --model.d_sae or --model.expansion")
        g = torch.Generator().manual_seed(hp.seed)
        W_dec = torch.randn(n, d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if hp.architecture == "jumprelu":
            self.log_theta = nn.Parameter(torch.full((n,), math.log(hp.jumprelu_theta)))
        self.register_buffer("input_scale", torch.ones(()))  # training inputs are x * input_scale
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def initialise(self, sample: Tensor) -> None:
        """Set the input scale and b_dec from a sample of raw training inputs (N, d_in)."""
        hp, x = self.hparams, sample.flatten(1).double()
        if hp.input_norm == "expected_norm":
            self.input_scale.fill_(math.sqrt(self.d_in / x.pow(2).sum(1).mean().clamp_min(1e-30).item()))
        xs = x * self.input_scale.double()
        center = {"geometric_median": geometric_median, "mean": lambda t: t.mean(0),
                  "zeros": lambda t: torch.zeros_like(t[0])}[hp.b_dec_init](xs)
        with torch.no_grad():
            self.b_dec.copy_(center.float())
        self.initialised = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "meta"):
            return
        self.meta = dm.meta
        slots = dm.layers if dm.layers is not None else list(range(len(dm.meta.layers)))
        self.layers, self.heads, self.n_heads_in = [dm.meta.layers[s] for s in slots], dm.heads, dm.n_heads
        d_in = dm.n_layers * dm.n_heads * dm.meta.d_head
        if not hasattr(self, "W_dec"):
            self._build(d_in)
        elif self.d_in != d_in:
            raise InputError(f"the SAE takes d_in={self.d_in} but the data gives {d_in} (layers x heads x d_head): "
                             f"select matching --data.layers/--data.heads")
        budget = self.hparams.token_budget
        whole_epochs = self.trainer.limit_train_batches in (None, 1.0) and self.trainer.world_size == 1
        if stage == "fit" and budget and self.trainer.max_epochs == -1 and whole_epochs:
            rows = len(dm.split_rows["train"])  # one process sees every training row once per epoch
            if rows:  # the budget stops training; this only makes the progress bar count the epochs it takes
                self.trainer.fit_loop.max_epochs = math.ceil(budget / rows)
        if stage == "fit" and not self.initialised:
            split = dm.split("train") if dm.in_memory else None
            if split is not None:
                n = min(self.hparams.init_rows, len(split))
                pos = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.hparams.seed))[:n]
                sample = split[pos]["z"]
            else:
                sample = next(iter(dm.train_dataloader()))["z"]
            self.initialise(sample)

    # --- the autoencoder ---------------------------------------------------------------------------------
    def _pre(self, xs: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc.T).to(xs.dtype)  # fp32 out of a bf16 autocast

    def _activate(self, pre: Tensor) -> Tensor:
        """Latents (B, n) from pre-activations, as at inference."""
        arch = self.hparams.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            vals, idx = _select_sorted(pre, self.hparams.k)
            return torch.zeros_like(pre).scatter_(1, idx, vals)
        if arch == "batchtopk":
            return pre * (pre > self.threshold)
        return pre * (pre > self.log_theta.exp())

    def encode(self, x: Tensor) -> Tensor:
        """Latents (B, d_sae) of raw inputs (B, d_in) or (B, L, H, D)."""
        return self._activate(self._pre(x.flatten(1) * self.input_scale))

    def decode(self, f: Tensor) -> Tensor:
        """Raw reconstruction (B, d_in) of latents (B, d_sae)."""
        return torch.addmm(self.b_dec, f, self.W_dec) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Raw reconstruction (B, d_in) of raw inputs (B, d_in) or (B, L, H, D), in inference mode."""
        xs = x.flatten(1) * self.input_scale
        if self.hparams.architecture == "topk":
            return topk_sae(xs, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.hparams.k)[0] / self.input_scale
        return self.decode(self._activate(self._pre(xs)))

    # --- training ----------------------------------------------------------------------------------------
    def _dead(self) -> Tensor:
        return (self.tokens_since_fired > self.hparams.dead_after_tokens).nonzero().squeeze(1)

    def _sparsity_coeff(self, coeff: float) -> float:
        warm = self.hparams.sparsity_warmup_steps
        return coeff * min(1.0, (self.global_step + 1) / warm) if warm else coeff

    def _aux_loss(self, e: Tensor, e_hat: Tensor) -> Tensor:
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)

    def loss(self, x: Tensor) -> tuple[Tensor, dict]:
        """Training loss on normalised inputs xs (B, d_in); returns (loss, logs) and updates firing statistics."""
        hp = self.hparams
        dead = self._dead() if hp.auxk_alpha > 0 and hp.architecture in ("topk", "batchtopk") else None
        logs = {}
        if hp.architecture == "topk" and hp.fused:
            k_aux = hp.k_aux or self.d_in // 2
            x_hat, vals, idx, aux_hat, _, aux_idx = topk_sae(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                             hp.k, dead, k_aux)
            fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
            fired[idx[vals > 0]] = True
            l0 = (vals > 0).sum(1).float().mean()
            loss = fve_loss = 1 - fve(x, x_hat)
            if aux_idx.shape[1]:
                aux = self._aux_loss((x - x_hat).detach(), aux_hat)
                loss = loss + hp.auxk_alpha * aux
                logs["train/auxk"] = aux.detach()
        else:
            pre = self._pre(x)
            if hp.architecture == "relu":
                f = pre.relu()
                penalty = (f * self.W_dec.norm(dim=1)).sum(1).mean()
                coeff = self._sparsity_coeff(hp.l1_coeff)
            elif hp.architecture == "jumprelu":
                theta = self.log_theta.exp()
                f = JumpReLU.apply(pre, theta, hp.jumprelu_eps)
                penalty = Step.apply(pre, theta, hp.jumprelu_eps).sum(1).mean()
                coeff = self._sparsity_coeff(hp.l0_coeff)
            elif hp.architecture == "batchtopk":
                act = pre.relu()
                flat = act.flatten()
                vals, pos = flat.topk(min(hp.k * len(x), flat.numel()), sorted=False)
                f = torch.zeros_like(flat).scatter(0, pos, vals).view_as(act)
                kept = vals[vals > 0]
                if len(kept):
                    m = hp.batchtopk_momentum
                    self.threshold.mul_(m if self.global_step else 0).add_((1 - m if self.global_step else 1)
                                                                          * kept.min().detach())
                penalty, coeff = pre.new_zeros(()), 0.0
            else:  # unfused topk: dense autograd, the reference for the fused kernel
                vals, idx = _select_sorted(pre, hp.k)
                f = torch.zeros_like(pre).scatter(1, idx, vals)
                penalty, coeff = pre.new_zeros(()), 0.0
            x_hat = f @ self.W_dec + self.b_dec
            fired = (f > 0).any(0)
            l0 = (f > 0).sum(1).float().mean()
            fve_loss = 1 - fve(x, x_hat)
            loss = fve_loss + coeff * penalty
            if coeff:
                logs["train/sparsity"] = penalty.detach()
            if dead is not None and len(dead):
                pre_dead = pre.index_select(1, dead).relu()  # (B, m)
                if (hp.k_aux or self.d_in // 2) >= len(dead):  # every dead latent, in dead's order
                    aux_hat = pre_dead @ self.W_dec[dead]
                else:
                    a_vals, j = pre_dead.topk(hp.k_aux or self.d_in // 2, dim=1)
                    aux_hat = F.embedding_bag(dead[j], self.W_dec, per_sample_weights=a_vals, mode="sum")
                aux = self._aux_loss((x - x_hat).detach(), aux_hat)
                loss = loss + hp.auxk_alpha * aux
                logs["train/auxk"] = aux.detach()
        with torch.no_grad():
            n_tokens = len(x)
            if self._trainer is not None and self.trainer.world_size > 1:  # DDP: count every rank's tokens
                fired = self.trainer.strategy.reduce(fired.int(), reduce_op="sum") > 0
                n_tokens *= self.trainer.world_size  # training shares are equal batches
            self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
            self.tokens_seen.add_(n_tokens)
        logs.update({"train/loss": loss.detach(), "train/fvu": fve_loss.detach(), "train/l0": l0.detach(),
                     "train/dead_frac": (self.tokens_since_fired > hp.dead_after_tokens).float().mean()})
        return loss, logs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["z"].flatten(1) * self.input_scale
        loss, logs = self.loss(x)
        self.log_dict(logs, prog_bar=False)
        self.log("train/fve", 1 - logs["train/fvu"], prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        budget = self.hparams.token_budget
        if budget and int(self.tokens_seen) >= budget:
            self.trainer.should_stop = True
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        budget = self.hparams.token_budget
        if budget and int(self.tokens_seen) >= budget:
            return -1
        return None

    def on_validation_epoch_start(self) -> None:
        from headprobe.probes.sae_eval import ReconstructionStats
        self._eval = ReconstructionStats(self.d_sae, self.hparams.dense_threshold)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["z"].flatten(1)
        f = self.encode(x)
        self._eval.update(x, self.decode(f), f)

    def on_validation_epoch_end(self, prefix: str = "val") -> None:
        if self.trainer.world_size > 1:  # DDP: metrics over every rank's share of the split
            self._eval.sum_over(lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu(),
                                self.d_in)
        metrics = self._eval.compute()
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in metrics.items() if not isinstance(v, Tensor)})

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end("test")

    def _progress(self, step: int) -> float:
        """Fraction of training done: tokens against the token budget, else steps against the Trainer's limit."""
        if self.hparams.token_budget:
            return float(self.tokens_seen) / self.hparams.token_budget
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        return step / total if math.isfinite(total) and total > 0 else 0.0

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr or 4e-3 / math.sqrt(self.d_sae / 4096)
        opt = torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(hp.betas))

        def factor(step: int) -> float:
            if hp.warmup_steps and step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            done = self._progress(step)
            return max(0.0, (1 - done) / (1 - hp.decay_start)) if hp.decay_start < 1 and done > hp.decay_start else 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.decoder_norm == "unit" and self.W_dec.grad is not None:
            remove_parallel_grad(self.W_dec)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.decoder_norm == "unit":
            with torch.no_grad():
                self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # --- checkpoints -------------------------------------------------------------------------------------
    def folded_tensors(self) -> dict[str, Tensor]:
        """Weights that act on raw activations: W_enc * c, b_dec / c, W_dec / c (latents are unchanged)."""
        c = self.input_scale
        out = {"W_enc": self.W_enc * c, "b_enc": self.b_enc, "W_dec": self.W_dec / c, "b_dec": self.b_dec / c,
               "threshold": self.threshold}
        if self.hparams.architecture == "jumprelu":
            out["log_theta"] = self.log_theta
        return {k: v.detach().float().cpu().clone() for k, v in out.items()}

    def checkpoint_config(self, meta=None) -> CheckpointConfig:
        """Provenance and hyperparameters for :func:`probes.checkpoint.save_checkpoint`."""
        meta = meta or self.meta
        if meta is None:
            raise InputError("this SAE has no record of its training data: pass the store's meta to save it")
        hparams = init_hparams(self)
        norm = {"input_norm": self.hparams.input_norm, "input_scale": float(self.input_scale), "folded": True,
                "b_dec_init": self.hparams.b_dec_init}
        cfg = CheckpointConfig.from_store(meta, type(self).__name__, hparams, heads=self.heads, normalisation=norm)
        if self.layers is not None:
            cfg.layers = list(self.layers)
        return cfg

    def save(self, folder: str | Path, meta=None, metrics: dict | None = None) -> Path:
        """Write a checkpoint folder with the normalisation folded into the weights."""
        return save_checkpoint(folder, self.folded_tensors(), self.checkpoint_config(meta), metrics)

    @classmethod
    def from_checkpoint(cls, config: CheckpointConfig, tensors: dict[str, Tensor]) -> "SparseAutoencoder":
        hp = dict(config.hparams)
        hp["d_in"] = tensors["W_dec"].shape[1]
        hp["d_sae"] = tensors["W_dec"].shape[0]
        if "betas" in hp:
            hp["betas"] = tuple(hp["betas"])
        sae = cls(**hp)
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(sae, name).copy_(value)
        sae.layers, sae.heads, sae.initialised = list(config.layers), config.heads, True
        sae.n_heads_in = len(config.heads) if config.heads else config.n_heads
        sae.checkpoint_config_loaded = config
        return sae.eval()

    def head_scores(self) -> dict[str, Tensor]:
        """(L, H) maps for the run's head table: mean decoder-norm share of each head, and the share of latents
        whose largest decoder block is that head."""
        shares = self.head_shares()
        top = shares.flatten(1).argmax(1)
        owned = torch.bincount(top, minlength=shares[0].numel()).view(shares.shape[1:]).float() / self.d_sae
        return {"sae/mean_share": shares.mean(0).numpy(), "sae/top_head_share": owned.numpy()}

    def head_shares(self, n_heads: int | None = None) -> Tensor:
        """Decoder-norm share of each head block per latent: (d_sae, L, H), rows sum to 1 (Kissane et al.)."""
        H = n_heads or self.n_heads_in
        if H is None:
            raise InputError("pass n_heads: this SAE does not know its head layout")
        L_ = len(self.layers) if self.layers is not None else 1
        norms = self.W_dec.detach().view(self.d_sae, L_, H, -1).norm(dim=-1)
        return norms / norms.sum((1, 2), keepdim=True).clamp_min(1e-12)


def remove_parallel_grad(W: nn.Parameter) -> None:
    """Project each row's gradient onto the tangent space of the unit sphere at that (unit-norm) row."""
    W.grad -= (W.grad * W.data).sum(1, keepdim=True) * W.data
