"""What a toy training records at every checkpoint, and the phase-change plot drawn from it.

At each checkpoint (every ``eval_every`` steps) the module measures, on its task's fixed evaluation batch, the loss
on each of the batch's masks (induction: the first and the second copy of ``[BOS, r1..r50, r1..r50]``), and, for
every head:

- the attention-pattern scores of :mod:`headprobe.probes.checks.head_scores` (previous-token, duplicate-token,
  induction) on ``[BOS, r1..r50, r1..r50]``;
- two OV-circuit scores on the token embeddings (the direct path ``E W_V^h W_O^h W_U``, norms folded in as their
  gains; a positive per-token scale does not change an argmax): ``copy``, the share of symbols whose top logit is
  the symbol itself, and ``successor``, the share whose top logit is its successor (Gould et al. 2023);
- the head's weight norm ``sqrt(|W_Q^h|^2 + |W_K^h|^2 + |W_V^h|^2 + |W_O^h|^2)`` (pruned heads go to ~0).

The record (``toy_training.json`` in the saved model folder) holds these curves, the settings and the final
values; :func:`plot_phase_change` draws the losses and the job scores against the step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headprobe.extract.tasks.toy import FIRST, N_SYMBOLS, repeated
from headprobe.probes.checks.head_scores import attention_patterns, pattern_scores

RECORD_FILE = "toy_training.json"
RECORD_FORMAT = 1
JOB_THRESHOLD = 0.5  # a head does a job when its score for it ends above this
PATTERN_N = 50


def pattern_tokens(seed: int = 0, batch: int = 8) -> torch.Tensor:
    """(batch, 1 + 2 * PATTERN_N) ``[BOS, r1..r50, r1..r50]`` over the toy alphabet."""
    return torch.as_tensor(repeated(np.random.default_rng((seed, 23, 9)), batch, PATTERN_N), dtype=torch.long)


def _head_blocks(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: W_Q, W_K, W_V as (H, d_head, d_model) and W_O as (H, d_model, d_head) (no grouped K/V)."""
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.hidden_size
    out = []
    for layer in model.model.layers:
        att = layer.self_attn
        q, k, v = (p.weight.detach().float().view(H, -1, d) for p in (att.q_proj, att.k_proj, att.v_proj))
        o = att.o_proj.weight.detach().float().view(d, H, -1).permute(1, 0, 2)
        out.append((q, k, v, o))
    return out


def head_norms(model: nn.Module) -> np.ndarray:
    """(L, H) weight norm of each head over its W_Q, W_K, W_V and W_O blocks."""
    return np.stack([sum(b.pow(2).sum((1, 2)) for b in blocks).sqrt().numpy() for blocks in _head_blocks(model)])


@torch.no_grad()
def ov_scores(model: nn.Module) -> dict[str, np.ndarray]:
    """{"copy": (L, H), "successor": (L, H)}: share of symbols whose top logit through the head's OV circuit on
    the token embeddings is the symbol itself / its successor."""
    emb = model.model.embed_tokens.weight.detach().float()[FIRST:FIRST + N_SYMBOLS]  # (S, d)
    unembed = model.lm_head.weight.detach().float()[FIRST:FIRST + N_SYMBOLS] * model.model.norm.weight.float()
    symbols = torch.arange(N_SYMBOLS)
    copy, succ = [], []
    for layer, (_, _, v, o) in zip(model.model.layers, _head_blocks(model)):
        x = emb * layer.input_layernorm.weight.detach().float()  # (S, d)
        written = torch.einsum("sd,hkd,hmk->hsm", x, v, o)  # (H, S, d): what each head writes for each symbol
        top = torch.einsum("hsm,tm->hst", written, unembed).argmax(-1)  # (H, S)
        copy.append((top == symbols).float().mean(1))
        succ.append((top == (symbols + 1) % N_SYMBOLS).float().mean(1))
    return {"copy": torch.stack(copy).numpy(), "successor": torch.stack(succ).numpy()}


def head_scores(model: nn.Module, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Every score of the module docstring: {name: (L, H)} (attention patterns on ``tokens``)."""
    scores = pattern_scores(attention_patterns(model, tokens), tokens, PATTERN_N)
    return {**scores, **ov_scores(model), "head_norm": head_norms(model)}


def job_heads(scores: dict, jobs: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """Per job: the head that scores highest on it ({"layer", "head", "score"}) and whether it passes the
    threshold."""
    out = {}
    for job in jobs:
        s = np.asarray(scores[job], dtype=float)
        layer, head = np.unravel_index(int(np.argmax(s)), s.shape)
        out[job] = {"layer": int(layer), "head": int(head), "score": float(s[layer, head]),
                    "done": bool(s[layer, head] > JOB_THRESHOLD)}
    return out


def phase_change_step(curves: list[dict]) -> int | None:
    """The first checkpoint step at which the second copy's loss is below half the first copy's (None: never, or
    a task without the two)."""
    for c in curves:
        loss = c["loss"]
        if "second" in loss and loss["second"] < 0.5 * loss["first"]:
            return int(c["step"])
    return None


def write_record(folder: Path, record: dict) -> Path:
    path = Path(folder) / RECORD_FILE
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path


def read_record(folder: str | Path) -> dict | None:
    """The toy training record of a model folder, or None if it has none."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def plot_phase_change(record: dict, path: str | Path) -> Path:
    """Loss per mask (top) and each head's job scores (bottom) against the training step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = record["curves"]
    steps = [c["step"] for c in curves]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.4), sharex=True)
    for name in curves[0]["loss"]:
        top.plot(steps, [c["loss"][name] for c in curves], label=f"loss, {name} copy" if name != "all" else "loss")
    top.set_ylabel("cross-entropy (nats)")
    top.legend(fontsize=8)
    L, H = np.shape(curves[0]["scores"]["head_norm"])
    styles = dict(zip(record["jobs"], ("-", "--", ":")))
    for job, style in styles.items():
        for layer in range(L):
            for head in range(H):
                ys = [c["scores"][job][layer][head] for c in curves]
                strong = max(ys) > JOB_THRESHOLD
                bottom.plot(steps, ys, style, linewidth=1.6 if strong else 0.6, alpha=1 if strong else 0.35,
                            label=f"L{layer}.H{head} {job.replace('_', '-')}" if strong else None)
    bottom.axhline(JOB_THRESHOLD, color="#999", linewidth=0.8, linestyle=":")
    bottom.set_ylabel("head score")
    bottom.set_xlabel("training step")
    if bottom.get_legend_handles_labels()[1]:
        bottom.legend(fontsize=8)
    change = record.get("phase_change_step")
    for ax in (top, bottom):
        if change is not None:
            ax.axvline(change, color="#c44", linewidth=0.8, linestyle="--")
    top.set_title(f"toy {record['task']}: {record['model']['n_layers']} layers x {H} heads"
                  + (f", phase change at step {change}" if change is not None else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
