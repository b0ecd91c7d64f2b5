"""Weight-only scores of every head's OV circuit: copying (Elhage et al. 2021; Olsson et al. 2022) and succession
(Gould et al. 2023, "Successor Heads", arXiv 2312.09230). No data, no forward pass of the model.

With row vectors, E (V, d) the token embedding, W_V^h (d, d_head) the value block of head h (grouped-query models:
the key-value head its query head shares), W_O^h (d_head, d) its output block, W_U (d, V) the unembedding, and the
norms' gains g_1 (before attention) and g_f (before the unembedding) folded in:

- **copying score**: the token-to-token circuit C = E diag(g_1) W_V W_O diag(g_f) W_U (V x V) has the nonzero
  eigenvalues of the d_head x d_head matrix M = W_O G diag(g_1) W_V with G = diag(g_f) W_U E computed once (d x d);
  score = sum(Re lambda) / sum(|lambda|) over M's eigenvalues, in [-1, 1], 1 for a head whose OV circuit copies
  (all mass on positive eigenvalues). W_U is centred over the vocabulary (each row minus the mean row: the softmax
  does not see a shift shared by all logits; TransformerLens's ``center_unembed``). Without it the direction every
  token's embedding shares dominates on SmolLM2: random token-to-token pairings (W_U's rows permuted) then score a
  median 0.75, with it 0.00. Norm biases and LayerNorm's centring of the input are left out (the usual folding).
- **succession score**: each token t of the ordinal sequences (days, months, letters, numbers, number words; the
  items that are one token, with or without a leading space) gets its effective embedding
  e_t = E[t] + MLP_0(norm_2,0(E[t])) (the first block's MLP with its attention skipped, as Gould et al.); the head's
  output logits are W_U norm_f(norm_1(e_t) W_V + b_V) W_O); the head succeeds on t when, among the tokens of t's
  sequence, the top logit is t's successor. Score = share of successes over all tokens that have a successor
  (cyclic sequences wrap).

Null: both scores of random heads (W_V and W_O Gaussian, the norms of a random layer, the model's own E, MLP_0 and
W_U): the threshold is their mean plus z_{1 - alpha/(L*H)} of their spread (``evidence.null_threshold``), i.e. what
a head without learned structure in its OV circuit reaches. Families: GPT-2, GPT-NeoX and Llama-style decoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from headprobe import InputError
from headprobe.extract.hooks import head_layout, output_weights, spec_for
from headprobe.probes.attribution.evidence import null_threshold
from headprobe.probes.checks.attention_capture import require_causal_lm

N_RANDOM = 512
NUMBER_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()


def _llama_values(block: nn.Module, n_kv: int, d_head: int):
    v = block.self_attn.v_proj
    b = v.bias.detach().view(n_kv, d_head) if v.bias is not None else None
    return v.weight.detach().view(n_kv, d_head, -1).transpose(1, 2), b


def _gpt2_values(block: nn.Module, n_kv: int, d_head: int):
    w, b = block.attn.c_attn.weight.detach(), block.attn.c_attn.bias.detach()  # Conv1D: (d, 3d)
    d = w.shape[0]
    return w[:, 2 * d:].reshape(d, n_kv, d_head).permute(1, 0, 2), b[2 * d:].view(n_kv, d_head)


def _neox_values(block: nn.Module, n_kv: int, d_head: int):
    qkv = block.attention.query_key_value
    w = qkv.weight.detach().view(n_kv, 3, d_head, -1)[:, 2]
    b = qkv.bias.detach().view(n_kv, 3, d_head)[:, 2] if qkv.bias is not None else None
    return w.transpose(1, 2), b


@dataclass(frozen=True)
class OVSpec:
    ln1: str  # block path of the norm before attention
    ln2: str  # block path of the norm before the MLP
    mlp: str  # block path of the MLP
    final_norm: str  # base-model path of the norm before the unembedding
    values: Callable  # (block, n_kv, d_head) -> (W_V (n_kv, d, d_head), b_V (n_kv, d_head) or None)


_LLAMA = OVSpec("input_layernorm", "post_attention_layernorm", "mlp", "norm", _llama_values)
OV_SPECS = {"gpt2": OVSpec("ln_1", "ln_2", "mlp", "ln_f", _gpt2_values),
            "gpt_neox": OVSpec("input_layernorm", "post_attention_layernorm", "mlp", "final_layer_norm", _neox_values),
            **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "starcoder2")}}


@dataclass
class OVWeights:
    """Everything the OV scores read, float32 on the CPU."""

    E: torch.Tensor  # (V, d)
    U: torch.Tensor  # (V, d) unembedding rows, centred over the vocabulary
    W_V: torch.Tensor  # (L, H, d, d_head) per query head
    b_V: torch.Tensor  # (L, H, d_head)
    W_O: torch.Tensor  # (L, H, d_head, d)
    g1: torch.Tensor  # (L, d) gain of the norm before attention
    gf: torch.Tensor  # (d,)
    ln1: list[nn.Module]
    final_norm: nn.Module
    mlp0: Callable[[torch.Tensor], torch.Tensor]  # effective embedding: x -> x + MLP_0(norm_2,0(x))


def ov_weights(model: nn.Module) -> OVWeights:
    """The embeddings, value and output blocks per query head, and the norms of a supported decoder."""
    require_causal_lm(model, "OV-circuit score")
    kind = model.config.model_type
    if kind not in OV_SPECS:
        raise InputError(f"OV-circuit scores support {', '.join(sorted(OV_SPECS))}; {kind} is not one of them")
    ov, layout = OV_SPECS[kind], head_layout(model)
    blocks = list(model.base_model.get_submodule(spec_for(model).layers))
    values = [ov.values(b, layout.n_kv_heads, layout.d_head) for b in blocks]
    group = layout.n_heads // layout.n_kv_heads
    W_V = torch.stack([w for w, _ in values]).float().cpu().repeat_interleave(group, 1)
    b_V = torch.stack([b if b is not None else torch.zeros(layout.n_kv_heads, layout.d_head) for _, b in values])
    W_O, _ = output_weights(model, list(range(layout.n_layers)))
    gain = lambda m: m.weight.detach().float().cpu() if getattr(m, "weight", None) is not None else torch.ones(
        layout.d_model)  # noqa: E731
    block0 = blocks[0]
    norm2, mlp = block0.get_submodule(ov.ln2), block0.get_submodule(ov.mlp)
    final = model.base_model.get_submodule(ov.final_norm)
    U = model.get_output_embeddings().weight.detach().float().cpu()
    return OVWeights(model.get_input_embeddings().weight.detach().float().cpu(), U - U.mean(0, keepdim=True), W_V,
                     b_V.float().cpu().repeat_interleave(group, 1), W_O.float().cpu(),
                     torch.stack([gain(b.get_submodule(ov.ln1)) for b in blocks]), gain(final),
                     [b.get_submodule(ov.ln1) for b in blocks], final, lambda x: x + mlp(norm2(x)))


def copying_from_matrices(M: torch.Tensor) -> torch.Tensor:
    """sum(Re lambda) / sum(|lambda|) of each square matrix in M (..., k, k): (...)."""
    lam = torch.linalg.eigvals(M.double())
    return (lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(1e-30)).float()


@torch.no_grad()
def copying_scores(w: OVWeights) -> np.ndarray:
    """Copying score (L, H) of every head (see the module's docstring), batched over layers and heads."""
    G = (w.gf[:, None] * w.U.T.double()) @ w.E.double()  # (d, d) = diag(g_f) W_U E
    M = w.W_O.double() @ G @ (w.g1[:, None, :, None].double() * w.W_V.double())  # (L, H, d_head, d_head)
    return copying_from_matrices(M).numpy()


def ordinal_tokens(tokenizer, sequences: dict[str, tuple[list[str], bool]] | None = None) -> dict[str, tuple]:
    """{name: (token ids in order, cyclic)} of the ordinal sequences whose items are single tokens (with a leading
    space where that keeps more of them, else without); sequences with fewer than 3 such items are left out.
    Default sequences: the successor task's (days, months, letters, numbers 1-60) and number words."""
    from headprobe.extract.tasks.builtin import SEQUENCES

    sequences = sequences or {**SEQUENCES, "number_word": (NUMBER_WORDS, False)}
    out = {}
    for name, (items, cyclic) in sequences.items():
        best: list[int] = []
        for lead in (" ", ""):
            ids = [tokenizer(lead + item, add_special_tokens=False)["input_ids"] for item in items]
            run = [i[0] for i in ids[:next((k for k, i in enumerate(ids) if len(i) != 1), len(ids))]]
            best = run if len(run) > len(best) else best
        if len(best) >= 3:
            out[name] = (best, cyclic and len(best) == len(items))
    return out


def _successor_targets(sequences: dict[str, tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids (N,), the successor's index among all tokens (N,), -1 without one; (N, N) same-sequence mask)."""
    tokens, succ, group = [], [], []
    for g, (ids, cyclic) in enumerate(sequences.values()):
        base = len(tokens)
        for k in range(len(ids)):
            nxt = (k + 1) % len(ids) if cyclic or k + 1 < len(ids) else -1
            tokens.append(ids[k])
            succ.append(base + nxt if nxt >= 0 else -1)
            group.append(g)
    group_t = torch.tensor(group)
    return torch.tensor(tokens), torch.tensor(succ), group_t[:, None] == group_t[None, :]


@torch.no_grad()
def succession_from(w: OVWeights, x: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor, W_O: torch.Tensor,
                    layers: list[int], sequences: dict[str, tuple]) -> torch.Tensor:
    """Succession scores of heads given by W_V (L', H', d, d_head), b_V (L', H', d_head), W_O (L', H', d_head, d)
    whose norm before attention is that of model layer ``layers[i]``, on effective embeddings ``x`` (N, d):
    (L', H')."""
    tokens, succ, same = _successor_targets(sequences)
    u = torch.stack([w.ln1[layer](x) for layer in layers]).float()  # (L', N, d)
    v = torch.einsum("lnd,lhde->lhne", u, W_V) + b_V[:, :, None]  # (L', H', N, d_head)
    o = w.final_norm(torch.einsum("lhne,lhed->lhnd", v, W_O))  # (L', H', N, d)
    logits = o.float() @ w.U[tokens].T  # (L', H', N, N) over the ordinal tokens
    logits = logits.masked_fill(~same, float("-inf"))  # only the tokens of the same sequence compete
    has = succ >= 0
    hit = logits.argmax(-1)[..., has] == succ[has]
    return hit.float().mean(-1)


def effective_embeddings(w: OVWeights, tokens: torch.Tensor) -> torch.Tensor:
    """E[t] + MLP_0(norm_2,0(E[t])) for each token (N,): (N, d)."""
    with torch.no_grad():
        return w.mlp0(w.E[tokens]).float()


def successor_scores(w: OVWeights, sequences: dict[str, tuple]) -> np.ndarray:
    """Succession score (L, H) of every head on the ordinal ``sequences`` of :func:`ordinal_tokens`."""
    if not sequences:
        raise InputError("no ordinal sequence has 3 or more single-token items in this tokenizer: the successor "
                         "score needs them")
    x = effective_embeddings(w, _successor_targets(sequences)[0])
    return succession_from(w, x, w.W_V, w.b_V, w.W_O, list(range(w.W_V.shape[0])), sequences).numpy()


def random_heads(w: OVWeights, n: int = N_RANDOM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` random heads: Gaussian W_V (n, 1, d, d_head), W_O (n, 1, d_head, d) and a random layer each (for its
    norms)."""
    g = torch.Generator().manual_seed(seed)
    _, _, d, k = w.W_V.shape
    layers = torch.randint(0, w.W_V.shape[0], (n,), generator=g).tolist()
    return torch.randn(n, 1, d, k, generator=g), torch.randn(n, 1, k, d, generator=g), layers


@torch.no_grad()
def ov_nulls(w: OVWeights, sequences: dict[str, tuple] | None, alpha: float = 0.01, n: int = N_RANDOM,
             seed: int = 0) -> dict[str, dict]:
    """Copying and succession scores of ``n`` random heads and the threshold a model head must pass (Bonferroni
    over the model's heads): {score: {"threshold", "mean", "std"}}."""
    W_V, W_O, layers = random_heads(w, n, seed)
    n_tests = w.W_V.shape[0] * w.W_V.shape[1]
    G = (w.gf[:, None] * w.U.T.double()) @ w.E.double()
    M = W_O.double() @ G @ (w.g1[layers][:, None, :, None].double() * W_V.double())
    scores = {"copying": copying_from_matrices(M).flatten().numpy()}
    if sequences:
        x = effective_embeddings(w, _successor_targets(sequences)[0])
        zero = torch.zeros(n, 1, W_V.shape[-1])
        scores["successor"] = succession_from(w, x, W_V, zero, W_O, layers, sequences).flatten().numpy()
    return {name: {"threshold": null_threshold(s, alpha, n_tests=n_tests), "mean": float(s.mean()),
                   "std": float(s.std())} for name, s in scores.items()}
