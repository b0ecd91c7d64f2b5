"""Sparse autoencoders on per-head outputs (Kissane et al. 2024): one layer's heads concatenated, one head, or
several layers, as one LightningModule whose architecture is a small object (probes/sae_arch.py).

Shapes: ``x`` (B, d_in) with d_in = layers x heads x d_head, flattened from a store batch ``z`` (B, L, H, D)
in (layer, head, d_head) order; latents ``f`` (B, d_sae); ``W_enc``, ``W_dec`` (d_sae, d_in), so one row of
``W_dec`` is one latent's direction and decoding is a gather.

Architectures (``architecture=``; probes/sae_arch.py, the sparse kernels in probes/sae_kernels.py):
    relu       f = ReLU(W_enc (x - b_dec) + b_enc), loss FVU + l1_coeff * sum_i f_i ||W_dec[i]||
    topk       the k largest pre-activations (ReLU'd); fused sparse forward/backward; AuxK on dead latents
    batchtopk  the B*k largest over the batch; a threshold (running average of the smallest kept value) at inference
    jumprelu   f = pre * H(pre - theta), loss FVU + l0_coeff * L0 with straight-through gradients for theta
    matryoshka BatchTopK with the loss averaged over nested prefixes of the latents (``matryoshka_prefixes``)

Practices, all options of :class:`SparseAutoencoder` and all logged as hyperparameters:
    input_norm="expected_norm"   inputs multiplied by c = sqrt(d_in / E||x||^2) during training; c is folded into
                                 the weights on export, so a saved SAE works on raw activations
    b_dec_init="geometric_median" | "mean" | "zeros"    from a sample of the training data
    decoder_norm="unit"          unit-norm decoder rows, gradient parallel to them removed before each step;
                                 "penalty": free norms (ReLU's L1 is weighted by them)
    warmup_steps, decay_start    linear LR warmup, then linear decay to 0 over the last (1 - decay_start) of training
    sparsity_warmup_steps        linear warmup of l1_coeff / l0_coeff
    dead_after_tokens            a latent that has not fired for this many tokens is dead (AuxK trains it)
    token_budget                 the module stops training after this many tokens (the Trainer's max_epochs -1)
Warm-ups are capped at fractions of the run (probes/sae_plan.py; an info line, and ``metrics.json`` "notes"), and
a width far above the training rows is warned about (an :class:`SAEWarning`, and ``metrics.json`` "warnings").
The reconstruction loss of every architecture is the batch FVU, sum((x - x_hat)^2) / sum((x - mean)^2).
"""
from __future__ import annotations

import math
import os
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from headprobe import InputError
from headprobe.probes.checkpoint import CheckpointConfig, init_hparams, register
from headprobe.probes.hub import FromPretrained
from headprobe.probes.sae_arch import ARCHITECTURES, Architecture, fvu_of
from headprobe.probes.sae_kernels import topk_sae
from headprobe.probes.sae_plan import RunPlan, plan_run, planned_steps, width_warning

__all__ = ["ARCHITECTURES", "SAEWarning", "SparseAutoencoder", "fve", "geometric_median", "topk_sae"]

B_DEC_INITS = ("geometric_median", "mean", "zeros")
CHOICES = {"b_dec_init": B_DEC_INITS, "input_norm": ("expected_norm", "none"), "decoder_norm": ("unit", "penalty")}
# option -> (allowed, what to pass instead); the coefficients and counts of every architecture
RANGES = {
    "d_sae": (lambda v: v >= 0, "pass a number of latents >= 0 (0: expansion x d_in)"),
    "expansion": (lambda v: v >= 0, "pass a number of latents per input dimension >= 0"),
    "d_in": (lambda v: v is None or v >= 1, "pass a positive input width, or leave it to the data"),
    "l1_coeff": (lambda v: v >= 0, "pass a coefficient >= 0"),
    "l0_coeff": (lambda v: v >= 0, "pass a coefficient >= 0"),
    "auxk_alpha": (lambda v: v >= 0, "pass a coefficient >= 0 (0: no AuxK)"),
    "jumprelu_theta": (lambda v: v > 0, "pass a threshold > 0"),
    "jumprelu_eps": (lambda v: v > 0, "pass a kernel width > 0"),
    "k_aux": (lambda v: v >= 0, "pass a number of dead latents >= 0 (0: d_in / 2)"),
    "dead_after_tokens": (lambda v: v >= 0, "pass a number of tokens >= 0"),
    "dense_threshold": (lambda v: 0 <= v <= 1, "pass a firing rate in [0, 1]"),
    "init_rows": (lambda v: v >= 1, "pass a positive number of rows"),
    "lr": (lambda v: v >= 0, "pass a learning rate >= 0 (0: 4e-3 / sqrt(d_sae / 4096))"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "pass two Adam betas in [0, 1)"),
    "warmup_steps": (lambda v: v >= 0, "pass a number of steps >= 0"),
    "decay_start": (lambda v: 0 < v <= 1, "pass a fraction of training in (0, 1]"),
    "sparsity_warmup_steps": (lambda v: v >= 0, "pass a number of steps >= 0"),
    "token_budget": (lambda v: v >= 0, "pass a number of tokens >= 0 (0: the Trainer's limits decide)"),
    "batchtopk_momentum": (lambda v: 0 <= v < 1, "pass a momentum in [0, 1)"),
    "matryoshka_prefixes": (lambda v: len(v) > 0 and all(0 < f < 1 for f in v), "pass fractions of d_sae in (0, 1)"),
}


class SAEWarning(UserWarning):
    """A sparse autoencoder's settings will probably train badly (the message says why and what to pass)."""


def check_options(hp) -> None:
    """Refuse settings that cannot train (one line naming the option and what to pass); ``k`` against the width is
    checked by :func:`check_k` once d_in and d_sae are known."""
    if hp.architecture not in ARCHITECTURES:
        raise InputError(f"unknown SAE architecture {hp.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    for option, choices in CHOICES.items():
        if hp[option] not in choices:
            raise InputError(f"unknown {option} {hp[option]!r}: choose one of {', '.join(choices)}")
    for option, (allowed, what) in RANGES.items():
        if not allowed(hp[option]):
            raise InputError(f"--model.{option} {hp[option]}: {what}")
    if not hp.d_sae and not hp.expansion:
        raise InputError("--model.d_sae 0 with --model.expansion 0 gives the SAE no latents: pass a positive d_sae "
                         "or expansion")
    if ARCHITECTURES[hp.architecture].uses_k and hp.k < 1:
        raise InputError(f"--model.k {hp.k}: pass a positive number of active latents per token")
    if hp.d_sae:
        check_k(hp, hp.d_sae)


def check_k(hp, d_sae: int, d_in: int | None = None) -> None:
    """Refuse a ``k`` that the SAE's ``d_sae`` latents cannot hold, or, when training on ``d_in`` inputs (None: not
    training), one with more active latents than inputs (a loaded checkpoint is not refused for that)."""
    if not ARCHITECTURES[hp.architecture].uses_k:
        return
    width = f"--model.d_sae {d_sae}" if hp.d_sae else f"{d_sae} latents (--model.expansion {hp.expansion} x d_in)"
    if hp.k > d_sae:
        raise InputError(f"--model.k {hp.k} is more than the SAE's {width}: pass a smaller k or a larger d_sae")
    if d_in is not None and hp.k > d_in:
        raise InputError(f"--model.k {hp.k} is more than the SAE's {d_in} inputs (d_in): a code with more active "
                         f"latents than input dimensions is not sparse; pass a smaller k")


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
    return 1 - fvu_of(x, x_hat)


# --- the module ----------------------------------------------------------------------------------------------
@register
class SparseAutoencoder(FromPretrained, L.LightningModule):
    """A sparse autoencoder on per-head outputs of the store's selected layers and heads.

    Args:
        architecture: "relu", "topk", "batchtopk", "jumprelu" or "matryoshka" (BatchTopK on nested prefixes).
        d_sae: number of latents; 0 means ``expansion * d_in``.
        expansion: latents per input dimension when ``d_sae`` is 0.
        d_in: input width; None infers layers x heads x d_head from the datamodule at setup.
        k: active latents per token (topk) or mean per token (batchtopk); at most d_sae, and d_in in training.
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
        warmup_steps: linear LR warmup, at most 10% of the run's steps (probes/sae_plan.py); decay_start: fraction
            of training after which the LR decays linearly to 0.
        sparsity_warmup_steps: linear warmup of the sparsity coefficient, at most 25% of the run's steps.
        token_budget: the module stops training after this many tokens (0: the Trainer's max_steps / max_epochs
            decide); with a budget, give the Trainer max_epochs -1 (train/configs/sae.yaml does).
        fused: TopK, BatchTopK, Matryoshka: use the fused sparse kernel (False: dense autograd, for checks).
        batchtopk_momentum: momentum of the BatchTopK threshold's bias-corrected running average, its window capped
            at 10% of the run; matryoshka_prefixes: Matryoshka's nested prefix widths as fractions of d_sae.
        seed: weight initialisation seed.
    """

    def __init__(self, architecture: str = "topk", d_sae: int = 0, expansion: int = 8, d_in: int | None = None,
                 k: int = 32, l1_coeff: float = 0.02, l0_coeff: float = 0.002, jumprelu_theta: float = 0.1,
                 jumprelu_eps: float = 0.05, auxk_alpha: float = 1 / 32, k_aux: int = 0,
                 dead_after_tokens: int = 200_000, dense_threshold: float = 0.1,
                 b_dec_init: str = "geometric_median", init_rows: int = 16384, input_norm: str = "expected_norm",
                 decoder_norm: str = "unit", lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 10, decay_start: float = 0.8, sparsity_warmup_steps: int = 0,
                 token_budget: int = 0, fused: bool = True, batchtopk_momentum: float = 0.99,
                 matryoshka_prefixes: tuple[float, ...] = (1 / 32, 1 / 8, 1 / 2), seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        check_options(self.hparams)
        self.arch: Architecture = ARCHITECTURES[architecture]()
        self.plan = RunPlan(warmup=warmup_steps, sparsity_warmup=sparsity_warmup_steps,
                            threshold_momentum=batchtopk_momentum)  # uncapped until a Trainer says how long the run is
        self.warnings: list[str] = []  # what the run was warned about (metrics.json "warnings")
        self.notes: list[str] = []  # what the run adapted, e.g. a warm-up capped to its length (metrics.json "notes")
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
        n = hp.d_sae or hp.expansion * d_in
        check_k(hp, n)
        hp.d_in = d_in
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
        extra = self.arch.extra_parameters(n, hp)  # the architecture's own tensors (JumpReLU's log_theta)
        self.extra_names = list(extra)
        for name, value in extra.items():
            self.register_parameter(name, nn.Parameter(value))
        self.register_buffer("input_scale", torch.ones(()))  # training inputs are x * input_scale
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def initialise(self, sample: Tensor) -> None:
        """Set the input scale and b_dec from a sample of raw training inputs (N, d_in), before training."""
        hp, x = self.hparams, sample.flatten(1).double()
        check_k(hp, self.d_sae, self.d_in)
        if hp.input_norm == "expected_norm":
            self.input_scale.fill_(math.sqrt(self.d_in / x.pow(2).sum(1).mean().clamp_min(1e-30).item()))
        xs = x * self.input_scale.double()
        center = {"geometric_median": geometric_median, "mean": lambda t: t.mean(0),
                  "zeros": lambda t: torch.zeros_like(t[0])}[hp.b_dec_init](xs)
        with torch.no_grad():
            self.b_dec.copy_(center.float())
        self.initialised = True

    def setup(self, stage: str) -> None:
        dm = getattr(self.attached_trainer, "datamodule", None)
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
        if stage != "fit":
            return
        advice = width_warning(self.d_sae, len(dm.split_rows["train"]))
        if advice:
            self.warn(advice)
        if not self.initialised:
            split = dm.split("train") if dm.in_memory else None
            if split is not None:
                n = min(self.hparams.init_rows, len(split))
                pos = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.hparams.seed))[:n]
                sample = split[pos]["z"]
            else:
                sample = next(iter(dm.train_dataloader()))["z"]
            self.initialise(sample)

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or None (``trainer`` raises when there is none)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def warn(self, message: str) -> None:
        """Show a one-line :class:`SAEWarning` (once per run, on rank zero) and keep it for metrics.json."""
        if message in self.warnings:
            return
        self.warnings.append(message)
        if self.attached_trainer is None or self.trainer.is_global_zero:
            warnings.warn(message, SAEWarning, stacklevel=2)

    # --- the autoencoder ---------------------------------------------------------------------------------
    def pre(self, xs: Tensor) -> Tensor:
        """Pre-activations (B, d_sae) of normalised inputs xs (B, d_in)."""
        return torch.addmm(self.b_enc, xs - self.b_dec, self.W_enc.T).to(xs.dtype)  # fp32 out of a bf16 autocast

    def encode(self, x: Tensor) -> Tensor:
        """Latents (B, d_sae) of raw inputs (B, d_in) or (B, L, H, D)."""
        return self.arch.latents(self, self.pre(x.flatten(1) * self.input_scale))

    def decode(self, f: Tensor) -> Tensor:
        """Raw reconstruction (B, d_in) of latents (B, d_sae)."""
        return torch.addmm(self.b_dec, f, self.W_dec) / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Raw reconstruction (B, d_in) of raw inputs (B, d_in) or (B, L, H, D), in inference mode."""
        return self.arch.reconstruct(self, x.flatten(1) * self.input_scale) / self.input_scale

    # --- training ----------------------------------------------------------------------------------------
    def _dead(self) -> Tensor:
        return (self.tokens_since_fired > self.hparams.dead_after_tokens).nonzero().squeeze(1)

    def sparsity_coeff(self) -> float:
        """The sparsity coefficient at this step (0 for architectures without a sparsity term)."""
        return self.arch.coefficient(self.hparams, self.global_step, self.plan.sparsity_warmup)

    def loss(self, x: Tensor) -> tuple[Tensor, dict]:
        """Training loss on normalised inputs xs (B, d_in); returns (loss, logs) and updates firing statistics."""
        hp = self.hparams
        dead = self._dead() if hp.auxk_alpha > 0 and self.arch.auxk else None
        out = self.arch.train_pass(self, x, dead)
        fvu = 1 - fve(x, out.x_hat)
        loss = fvu if out.recon is None else out.recon
        logs = {}
        if out.penalty is not None:
            loss = loss + self.sparsity_coeff() * out.penalty
            logs["train/sparsity"] = out.penalty.detach()
        if out.aux_hat is not None:
            aux = fvu_of((x - out.x_hat).detach(), out.aux_hat)
            loss = loss + hp.auxk_alpha * aux
            logs["train/auxk"] = aux.detach()
        self._count_firing(out.fired, len(x))
        logs.update({"train/loss": loss.detach(), "train/fvu": fvu.detach(), "train/l0": out.l0.detach(),
                     "train/dead_frac": (self.tokens_since_fired > hp.dead_after_tokens).float().mean()})
        return loss, logs

    @torch.no_grad()
    def _count_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Update the tokens seen and each latent's tokens since it last fired; fired (d_sae,) bool."""
        if self.attached_trainer is not None and self.trainer.world_size > 1:  # DDP: count every rank's tokens
            fired = self.trainer.strategy.reduce(fired.int(), reduce_op="sum") > 0
            n_tokens *= self.trainer.world_size  # training shares are equal batches
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.tokens_seen.add_(n_tokens)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = batch["z"].flatten(1) * self.input_scale
        loss, logs = self.loss(x)
        self.log_dict(logs, prog_bar=False)
        self.log("train/fve", 1 - logs["train/fvu"], prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self._budget_spent():  # the module ends training at its token budget; max_epochs -1 leaves it to us
            self.trainer.should_stop = True
        return loss

    def _budget_spent(self) -> bool:
        budget = self.hparams.token_budget
        return bool(budget) and int(self.tokens_seen) >= budget

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if self._budget_spent() else None

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
        total = self.trainer.estimated_stepping_batches if self.attached_trainer is not None else float("inf")
        return step / total if math.isfinite(total) and total > 0 else 0.0

    def configure_optimizers(self):
        hp = self.hparams
        self.plan = plan_run(hp, planned_steps(self.trainer, hp.token_budget))
        for note in self.plan.notes:
            if note not in self.notes:
                self.notes.append(note)
                rank_zero_info(note)
        lr = hp.lr or 4e-3 / math.sqrt(self.d_sae / 4096)
        opt = torch.optim.Adam(self.parameters(), lr=lr, betas=tuple(hp.betas))

        def factor(step: int) -> float:
            warmup = self.plan.warmup
            if warmup and step < warmup:
                return (step + 1) / warmup
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
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Weights that act on raw activations: W_enc * c, b_dec / c, W_dec / c (latents are unchanged)."""
        c = self.input_scale
        out = {"W_enc": self.W_enc * c, "b_enc": self.b_enc, "W_dec": self.W_dec / c, "b_dec": self.b_dec / c,
               "threshold": self.threshold}
        out.update({name: getattr(self, name) for name in self.extra_names})
        return {k: v.detach().float().cpu().clone() for k, v in out.items()}

    def checkpoint_metrics(self) -> dict:
        """metrics.json: the logged scalars, and the run's warnings and notes (lists of lines) if it had any."""
        trainer = self.attached_trainer
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()} if trainer is not None else {}
        metrics.update({key: list(lines) for key, lines in (("warnings", self.warnings), ("notes", self.notes))
                        if lines})
        return metrics

    def checkpoint_config(self, meta=None) -> CheckpointConfig:
        """Provenance and hyperparameters for :func:`headprobe.probes.checkpoint.export`."""
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
        """Decoder-norm share of each head block per latent: (d_sae, L, H), rows sum to 1 (Kissane et al.; see
        :func:`decoder_head_shares`)."""
        H = n_heads or self.n_heads_in
        if H is None:
            raise InputError("pass n_heads: this SAE does not know its head layout")
        L_ = len(self.layers) if self.layers is not None else 1
        shares = decoder_head_shares(self.W_dec.detach(), L_ * H)  # (d_sae, L * H)
        return torch.from_numpy(shares).float().view(self.d_sae, L_, H)


def decoder_head_shares(W_dec: np.ndarray | torch.Tensor, n_heads: int) -> np.ndarray:
    """Decoder-norm share of every head in every feature: W_dec (F, H*D) -> (F, H), rows summing to 1.

    ``w[f, h] = ||W_dec[f, h-block]|| / sum_h' ||W_dec[f, h'-block]||``; a feature with an all-zero decoder row
    gets uniform shares.
    """
    W = torch.as_tensor(W_dec, dtype=torch.float64)
    if W.shape[1] % n_heads:
        raise InputError(f"decoder width {W.shape[1]} is not a multiple of {n_heads} heads: pass W_dec as (F, H*D)")
    norms = W.view(W.shape[0], n_heads, -1).norm(dim=2)  # (F, H)
    total = norms.sum(dim=1, keepdim=True)
    return torch.where(total > 0, norms / total.clamp_min(1e-300), torch.full_like(norms, 1.0 / n_heads)).numpy()


def remove_parallel_grad(W: nn.Parameter) -> None:
    """Project each row's gradient onto the tangent space of the unit sphere at that (unit-norm) row."""
    W.grad -= (W.grad * W.data).sum(1, keepdim=True) * W.data
