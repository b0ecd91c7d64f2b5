"""The toy transformer: a small Llama-architecture decoder trained from scratch, as a LightningModule.

The network is a plain ``transformers`` ``LlamaForCausalLM`` (RoPE positions, RMSNorm, no grouped K/V, untied
embeddings), so the saved folder loads through :func:`headprobe.extract.models.load_model` and every stage of
headprobe runs on it unchanged. *Attention-only* (``attn_only``, the default) keeps Llama's MLP blocks but gives
them width 1 and weights fixed at zero (frozen, so they add exactly nothing); with ``attn_only: false`` they are
trained MLPs of width ``d_mlp``.

Training minimises the cross-entropy of the task's targets plus a head-sparsity penalty
``head_l1 * sum_heads (|[W_V^h; W_O^h]| + qk_share * |[W_Q^h; W_K^h]|)`` (group lasso, one group per head and
path). Without it every head of a layer learns the same job (on repeated random symbols all four layer-1 heads
become induction heads and no single head matters); with it each job ends in one head and the others fade to
~zero weights, so that ablating one head shows the mechanism. ``head_l1: 0`` turns it off.
"""
from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch

from headprobe import InputError
from headprobe.extract.tasks.toy import BOS, EOS, SPECIALS, SYMBOLS, UNK, VOCAB_SIZE
from headprobe.train.toy import record
from headprobe.train.toy.tasks import IGNORE, TASKS, ToyBatch


def build_network(n_layers: int, n_heads: int, d_model: int, attn_only: bool, d_mlp: int, init_std: float,
                  max_positions: int, seed: int):
    """A freshly initialised LlamaForCausalLM over the toy vocabulary (MLPs zeroed and frozen if ``attn_only``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=d_model, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_heads,
                         intermediate_size=1 if attn_only else d_mlp, max_position_embeddings=max_positions,
                         initializer_range=init_std, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=UNK,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = LlamaForCausalLM(config)
    if attn_only:
        for layer in net.model.layers:
            for p in layer.mlp.parameters():
                p.data.zero_()
                p.requires_grad_(False)
    return net


def symbol_tokenizer():
    """The toy models' tokenizer: one token per symbol of the alphabet, ``<s>`` first; any other character is
    ``<unk>`` (id 0, also the padding token)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{c: len(SPECIALS) + i for i, c in enumerate(SYMBOLS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIALS[UNK]))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[BOS]} $A",
                                                       special_tokens=[(SPECIALS[BOS], BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[BOS], eos_token=SPECIALS[EOS],
                                   pad_token=SPECIALS[UNK], unk_token=SPECIALS[UNK])


def head_group_penalty(net, qk_share: float, power: float = 1.0) -> torch.Tensor:
    """sum over heads of |[W_V^h; W_O^h]|^power + qk_share * |[W_Q^h; W_K^h]|^power (Frobenius norms)."""
    H, d = net.config.num_attention_heads, net.config.hidden_size
    rows = lambda p: p.weight.view(H, -1, d).pow(2).sum((1, 2))  # noqa: E731  (H,) per head
    terms = []
    for layer in net.model.layers:
        att = layer.self_attn
        ov = rows(att.v_proj) + att.o_proj.weight.view(d, H, -1).pow(2).sum((0, 2))
        qk = rows(att.q_proj) + rows(att.k_proj)
        terms.append(ov.clamp_min(1e-8).pow(power / 2).sum() + qk_share * qk.clamp_min(1e-8).pow(power / 2).sum())
    return torch.stack(terms).sum()


class ToyTransformer(L.LightningModule):
    """A small decoder trained from scratch on a synthetic task (``headprobe toy train``).

    Args:
        task: induction, previous_token or successor (train/toy/tasks.py)
        n_layers: transformer blocks (1-4 is the usual toy range)
        n_heads: attention heads per layer
        d_model: residual stream width (d_head = d_model / n_heads)
        attn_only: MLPs of width 1 fixed at zero (attention-only); false: trained MLPs of width d_mlp
        d_mlp: MLP width when not attention-only
        init_std: standard deviation of the initial weights (a large one shortens the plateau before the phase
            change)
        lr: AdamW learning rate (cosine decay to lr * lr_end over the run's steps)
        lr_end: the learning rate at the last step, as a share of lr (1: constant)
        weight_decay: AdamW weight decay
        head_l1: weight of the head-sparsity penalty (0: none)
        qk_share: the penalty's weight on W_Q, W_K relative to W_V, W_O
        head_power: power of each head's norm in the penalty (1: group lasso; below 1 it is concave, so one head
            doing a job costs less than two sharing it, which breaks ties between redundant heads)
        max_positions: positions the RoPE cache is built for
        seed: initialisation seed (the data seed is the data module's)
    """

    def __init__(self, task: str = "induction", n_layers: int = 2, n_heads: int = 4, d_model: int = 64,
                 attn_only: bool = True, d_mlp: int = 256, init_std: float = 0.1, lr: float = 3e-3,
                 lr_end: float = 0.1, weight_decay: float = 0.0, head_l1: float = 0.02, qk_share: float = 0.1,
                 head_power: float = 1.0, max_positions: int = 256, seed: int = 0):
        super().__init__()
        if task not in TASKS:
            raise InputError(f"--model.task {task!r}: choose one of {', '.join(TASKS)}")
        if n_layers < 1 or n_heads < 1 or d_model % n_heads:
            raise InputError(f"--model.n_layers {n_layers}, --model.n_heads {n_heads}, --model.d_model {d_model}: "
                             f"pass 1 or more layers and heads, and a d_model divisible by n_heads")
        if not 0 < head_power <= 1:
            raise InputError(f"--model.head_power {head_power}: pass a power in (0, 1]")
        if head_l1 < 0 or lr <= 0 or init_std <= 0 or not 0 <= lr_end <= 1:
            raise InputError(f"--model.head_l1 {head_l1}, --model.lr {lr}, --model.lr_end {lr_end}, --model.init_std "
                             f"{init_std}: pass a head_l1 of 0 or more, a positive lr and init_std, an lr_end in 0..1")
        self.save_hyperparameters()
        self.task = TASKS[task]
        self.net = build_network(n_layers, n_heads, d_model, attn_only, d_mlp, init_std, max_positions, seed)
        self.curves: list[dict] = []
        self._pattern_tokens = record.pattern_tokens()
        self._seconds_before, self._started = 0.0, time.perf_counter()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S) -> logits (B, S, V)."""
        return self.net(input_ids=ids).logits

    def losses(self, batch: ToyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss over trained targets, per-position loss (B, S), per-position hit (B, S))."""
        logits = self(batch.ids)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), batch.targets,
                                               ignore_index=IGNORE, reduction="none")  # (B, S)
        trained = batch.targets != IGNORE
        return ce[trained].mean(), ce, logits.argmax(-1) == batch.targets

    def training_step(self, batch: ToyBatch, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.losses(batch)
        if not self.hparams.head_l1:
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch.ids))
            return loss
        penalty = head_group_penalty(self.net, self.hparams.qk_share, self.hparams.head_power)
        self.log_dict({"train/loss": loss, "train/head_penalty": penalty}, prog_bar=True, on_step=True,
                      on_epoch=False, batch_size=len(batch.ids))
        return loss + self.hparams.head_l1 * penalty

    @torch.no_grad()
    def checkpoint_point(self, batch: ToyBatch) -> dict:
        """The curves' point at this step: loss and accuracy per mask of the evaluation ``batch``, every head's
        scores (:mod:`.record`)."""
        _, ce, hit = self.losses(batch)
        scores = record.head_scores(self.net, self._pattern_tokens.to(self.device))
        return {"step": int(self.global_step), "seconds": round(self.seconds(), 2),
                "loss": {k: float(ce[m].mean()) for k, m in batch.masks.items()},
                "accuracy": {k: float(hit[m].float().mean()) for k, m in batch.masks.items()},
                "scores": {k: np.round(v, 4).tolist() for k, v in scores.items()}}

    def add_point(self, batch: ToyBatch) -> dict:
        """Measure :meth:`checkpoint_point`, append it to the curves and send it to the loggers."""
        point = self.checkpoint_point(batch)
        self.curves.append(point)
        logged = {f"val/loss_{k}": v for k, v in point["loss"].items()}
        logged.update({f"val/accuracy_{k}": v for k, v in point["accuracy"].items()})
        for name in ("previous_token", "induction", "copy", "successor", "head_norm"):
            logged.update({f"heads/{name}/L{i}.H{j}": s for (i, j), s in np.ndenumerate(point["scores"][name])})
        for logger in self.loggers:
            logger.log_metrics(logged, step=point["step"])
        return point

    def seconds(self) -> float:
        """Training time so far, earlier segments of a resumed run included."""
        return self._seconds_before + time.perf_counter() - self._started

    def on_train_start(self) -> None:
        self._started = time.perf_counter()
        if not self.curves:  # the untrained model is the curves' first point
            was = self.training
            self.eval()
            self.add_point(self.trainer.datamodule.eval_batch(self.device))
            self.train(was)

    def validation_step(self, batch: ToyBatch, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            self.add_point(batch)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total, end = self.trainer.estimated_stepping_batches, self.hparams.lr_end
        if not 0 < total < float("inf"):
            raise InputError("the toy module needs a run of known length for its learning-rate schedule: train it "
                             "with max_epochs or max_steps on a loader with a length (ToyData)")
        total = int(total)
        decay = lambda step: end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, decay),
                                                   "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["toy_curves"] = self.curves
        checkpoint["toy_seconds"] = self.seconds()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.curves = list(checkpoint.get("toy_curves", []))
        self._seconds_before = float(checkpoint.get("toy_seconds", 0.0))
