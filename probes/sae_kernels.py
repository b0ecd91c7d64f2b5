"""Sparse kernels of the sparse autoencoders (probes/sae.py): the fused TopK autoencoder and the straight-through
functions of JumpReLU.

Shapes: ``x`` (B, d_in); ``W_enc``, ``W_dec`` (n, d_in) with n latents, so one row of ``W_dec`` is one latent's
direction and decoding a k-sparse code is a gather (``F.embedding_bag``); ``idx`` (B, k) latent indices sorted per
row, ``vals`` (B, k) their (ReLU'd) activations.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def row_dots(idx: Tensor, a: Tensor, w: Tensor) -> Tensor:
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


def scatter_rows(idx: Tensor, coef: Tensor, rows: Tensor, n: int) -> Tensor:
    """out[i] = sum over (b, j) with idx[b, j] == i of coef[b, j] * rows[b]: S^T @ rows for a k-sparse S.

    idx, coef (B, k); rows (B, d) -> (n, d). A sparse COO product: touches B * k * d values, not B * n * d.
    """
    B, k = idx.shape
    owner = torch.arange(B, device=idx.device).repeat_interleave(k)
    S = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), owner]), coef.reshape(-1), (n, B),
                                check_invariants=False)
    return torch.sparse.mm(S, rows)


def select_sorted(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row, ReLU'd, with column indices sorted ascending: (B, k), (B, k)."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1)
    return vals.gather(1, order).relu_(), idx


def select_batch(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK's selection: the B*k largest ReLU'd entries of pre (B, n) over the whole batch, per row as
    (values, sorted indices) (B, m) with the entries not kept zeroed. Each row's top m candidates are searched,
    m from 4k up, doubled while a row keeps all m (it may hold more): the result is exact."""
    B, n = pre.shape
    m = min(n, 4 * k)
    while True:
        vals, idx = select_sorted(pre, m)
        flat = vals.flatten()
        cut = flat.topk(min(B * k, flat.numel()), sorted=False).values.min()
        kept = (vals >= cut) & (vals > 0)
        if m == n or not bool(kept.all(1).any()):
            return vals * kept, idx
        m = min(n, 2 * m)


class TopKSAEFunction(torch.autograd.Function):
    """Fused TopK autoencoder: dense encode, top-k, gather decode; the backward touches only selected latents.

    forward(x (B, d_in), W_enc (n, d_in), b_enc (n,), W_dec (n, d_in), b_dec (d_in,), k, dead (m,) int64 or
    None, k_aux, batch) -> x_hat (B, d_in), vals (B, k), idx (B, k), aux_hat (B, d_in), aux_vals (B, k_a), aux_idx.
    ``aux_hat`` decodes (without b_dec) the k_aux largest pre-activations among the ``dead`` latents. ``batch``:
    BatchTopK's selection (:func:`select_batch`; vals, idx (B, m), zeros where not kept) instead of k per row.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, batch=False):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc.T).to(x.dtype)  # (B, n): the only dense product (bf16 under autocast)
        vals, idx = select_batch(pre, k) if batch else select_sorted(pre, k)
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
        k_a = min(k_aux, len(dead)) if dead is not None else 0
        if k_a > 0:
            aux_vals, j = select_sorted(pre.index_select(1, dead), k_a)
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
        n = W_dec.shape[0]
        g_hat = torch.zeros_like(x_c) if g_hat is None else g_hat
        g_aux_hat = torch.zeros_like(x_c) if g_aux_hat is None else g_aux_hat
        # dL/d(selected pre-activations): through the decoder, plus any direct use of the values; ReLU mask.
        g_main = row_dots(idx, g_hat, W_dec) + (0 if g_vals is None else g_vals)
        g_main = g_main * (vals > 0)
        g_aux = row_dots(aux_idx, g_aux_hat, W_dec) + (0 if g_aux_vals is None else g_aux_vals)
        g_aux = g_aux * (aux_vals > 0)
        all_idx, g_pre = torch.cat([idx, aux_idx], 1), torch.cat([g_main, g_aux], 1)  # (B, k + k_a)

        grad_x = grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = None
        need = ctx.needs_input_grad
        if need[1]:
            grad_W_enc = scatter_rows(all_idx, g_pre, x_c, n)
        if need[2] or need[4]:
            grad_b_enc = torch.zeros(n, dtype=g_pre.dtype, device=g_pre.device).index_add_(
                0, all_idx.reshape(-1), g_pre.reshape(-1))
        if need[3]:
            grad_W_dec = scatter_rows(idx, vals, g_hat, n)
            if aux_idx.shape[1]:
                grad_W_dec += scatter_rows(aux_idx, aux_vals, g_aux_hat, n)
        if need[0] or need[4]:
            g_xc = (F.embedding_bag(all_idx, W_enc, per_sample_weights=g_pre, mode="sum") if need[0]
                    else None)
            if need[0]:
                grad_x = g_xc
            if need[4]:
                enc_part = g_xc.sum(0) if g_xc is not None else grad_b_enc @ W_enc
                grad_b_dec = g_hat.sum(0) - enc_part
        return grad_x, grad_W_enc, (grad_b_enc if need[2] else None), grad_W_dec, grad_b_dec, None, None, None, None


def topk_sae(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int,
             dead: Tensor | None = None, k_aux: int = 0, batch: bool = False) -> tuple[Tensor, ...]:
    """Functional form of :class:`TopKSAEFunction` (see there for shapes)."""
    return TopKSAEFunction.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead, k_aux, batch)


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
