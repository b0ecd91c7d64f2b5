"""The batched Newton solver: P linear probes (logistic, softmax or ridge) on the same rows, solved at once.

Plain torch (no Lightning): :class:`~headprobe.probes.linear.LinearProbes` trains it over Lightning epochs, and
:func:`fit_newton` runs it on tensors in memory::

    import torch
    from headprobe.probes.newton import fit_newton, probe_logits
    x = torch.randn(500, 12, 16); y = (x[:, 3, :1] > 0).double()  # x (N rows, P probes, F), y (N, K label sets)
    W, info = fit_newton(x, y, "logistic")  # W (K, P, F + 1, C): each probe's weights, then its intercept
    acc = ((probe_logits(x, W)[..., 0] > 0) == y.bool()[..., None]).double().mean(0)  # (K, P): probe 3 near 1

Each probe's objective is scikit-learn's::

    sum_n loss(x_n . w + b, y_n) + l2 / 2 * ||w||^2         (intercept b unpenalised; l2 = 1 / C)

with loss = log-loss (logistic: binary, softmax: multiclass) or squared error / 2 (ridge, = sklearn Ridge(alpha=l2)).
Newton's method (IRLS) is invariant to each probe's feature scale (a joint first-order optimiser is not: attention
heads' scales differ ~100x). K label sets (a task and its controls) are solved in the same pass over x.

Streamed minibatches: :func:`newton_stats` sums the objective, gradient and Hessian of one batch, and
:meth:`NewtonState.update` takes one step from the sums of a whole pass. A probe whose objective went up is halved
back towards its previous weights instead (a backtracking line search spread over passes), so streaming data needs
no second pass. A probe is done once its gradient is below ``tol`` (mean-loss scale); later steps compute only the
probes not yet done, and a probe already near its optimum reuses its last Hessian. Typically 6-8 steps, with most
probes done after 4-5.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from headprobe import InputError

LOSSES = ("auto", "logistic", "softmax", "ridge")


@contextmanager
def one_thread() -> Iterator[int]:
    """Torch ops inside run on one thread (the count is restored after); yields the count from before.

    The solver's many small batched ops gain nothing from a second thread, and on a busy machine every op that
    splits over threads waits for the slowest (measured: up to 10x slower); it parallelises over probe chunks
    instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def loss_terms(eta: Tensor, y: Tensor, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, gradient w.r.t. eta and curvature for eta (..., N, C) and labels y (..., N).

    Returns loss (..., N), r (..., N, C) and A (..., N, C, C)."""
    if loss == "ridge":
        d = eta[..., 0] - y
        return 0.5 * d * d, d[..., None], torch.ones_like(eta)[..., None]
    if loss == "logistic":
        e = eta[..., 0]
        mu = torch.sigmoid(e)
        return nn.functional.softplus(e) - y * e, (mu - y)[..., None], (mu * (1 - mu))[..., None, None]
    logp = eta.log_softmax(-1)
    mu = logp.exp()
    onehot = nn.functional.one_hot(y.long(), eta.shape[-1]).to(eta.dtype)
    A = torch.diag_embed(mu) - mu[..., :, None] * mu[..., None, :]
    return -(logp * onehot).sum(-1), mu - onehot, A


def newton_stats(x: Tensor, y: Tensor, W: Tensor, loss: str, probes: Tensor | None = None,
                 n_hessian: int | None = None, chunk_bytes: int = 1 << 21,
                 hessian_dtype: torch.dtype = torch.float32
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Objective terms of one batch at weights W for the probes ``probes`` (indices, default all), summed over rows.

    x (P, N, F) activations, probe-major (contiguous is fastest: chunks are then plain copies; pass a transposed
    (N, P, F) view otherwise), y (N, K) labels of K label sets (task + controls), W (K, P, F + 1, C) with the
    intercept in the last row. Returns, for the Pa selected probes, loss (K, Pa), gradient (K, Pa, F + 1, C) and
    the Hessian of the first ``n_hessian`` of them (default all), (K, n_hessian, (F + 1) C, (F + 1) C). Loss and
    gradient are exact in W's dtype; the Hessian (the N F^2 cost) is a batched matrix product in
    ``hessian_dtype``: an inexact Hessian slows only the last digits of Newton's convergence, not where it converges.

    On the CPU, probes go in chunks of about ``chunk_bytes`` of activations, each copied into (Pc, N, F + 1)
    buffers that stay in cache for all their products; ``torch.get_num_threads()`` workers take chunks one at a time,
    each computing with one thread (see :func:`one_thread`). The result does not depend on the thread count.
    """
    with one_thread() as threads:
        return _newton_stats(x, y, W, loss, probes, n_hessian, chunk_bytes, hessian_dtype, threads)


def _newton_stats(x: Tensor, y: Tensor, W: Tensor, loss: str, probes: Tensor | None, n_hessian: int | None,
                  chunk_bytes: int, hessian_dtype, threads: int) -> tuple[Tensor, Tensor, Tensor]:
    P, N, Fd = x.shape
    K, C = W.shape[0], W.shape[-1]
    F1, dtype = Fd + 1, W.dtype
    probes = torch.arange(P, device=W.device) if probes is None else probes.to(W.device)
    Pa = len(probes)
    nh = Pa if n_hessian is None else n_hessian
    loss_sum = W.new_zeros(K, Pa)
    grad = W.new_zeros(K, Pa, F1, C)
    hess = W.new_zeros(K, nh, F1 * C, F1 * C)
    cpu = x.device.type == "cpu"
    budget = chunk_bytes if cpu else max(chunk_bytes, 1 << 30)  # an accelerator wants big chunks
    step = max(1, min(Pa, budget // max(1, N * F1 * W.element_size())))
    yk = y.T.to(dtype)  # (K, N)
    local = threading.local()

    def chunk(a0: int) -> None:
        a1 = min(Pa, a0 + step)
        idx, Pc = probes[a0:a1], a1 - a0
        if not hasattr(local, "xa"):  # work buffers of this thread, reused by its chunks (no page faults per chunk)
            local.xa = x.new_ones(step, N, F1, dtype=dtype)  # the last column (ones) is the intercept's feature
            local.xh = local.xa if dtype == hessian_dtype else x.new_ones(step, N, F1, dtype=hessian_dtype)
            local.xs = x.new_empty(step, K, N, F1, dtype=hessian_dtype) if C == 1 else None
        xa, xh = local.xa[:Pc], local.xh[:Pc]  # (Pc, N, F + 1)
        run = Pc == 1 or bool((idx.diff() == 1).all())  # consecutive probes in order: a view, no gather
        m = min(a1, nh) - a0  # probes of this chunk that want a Hessian
        for buf in [xa] if local.xh is local.xa or m <= 0 else [xa, xh]:
            buf[..., :Fd].copy_(x[int(idx[0]):int(idx[0]) + Pc] if run else x[idx])
        # the products with few columns are written with the K C label-set outputs as rows: (Pc, K C, N)
        Wt = W[:, idx].permute(1, 0, 3, 2).reshape(Pc, K * C, F1)
        eta = torch.bmm(Wt, xa.transpose(1, 2)).view(Pc, K, C, N).transpose(-1, -2)  # (Pc, K, N, C)
        l_, r, A = loss_terms(eta, yk, loss)
        loss_sum[:, a0:a1] = l_.sum(-1).T
        g = torch.bmm(r.transpose(-1, -2).reshape(Pc, K * C, N), xa)  # (Pc, K C, F + 1)
        grad[:, a0:a1] = g.view(Pc, K, C, F1).permute(1, 0, 3, 2)
        if m <= 0:
            return
        xh, A = xh[:m], A[:m]
        if C == 1:
            xs = torch.mul(xh[:, None], A[..., 0].to(hessian_dtype), out=local.xs[:m])  # (m, K, N, F + 1)
            h = xs.transpose(-1, -2) @ xh[:, None]  # (m, K, F + 1, F + 1)
        else:
            h = torch.einsum("pnf,pknce,png->pkfcge", xh, A.to(hessian_dtype), xh)
        hess[:, a0:a0 + m] = h.reshape(m, K, F1 * C, F1 * C).transpose(0, 1)

    starts = range(0, Pa, step)
    workers = min(threads, len(starts)) if cpu else 1
    if workers <= 1:
        for a0 in starts:
            chunk(a0)
    else:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(chunk, starts))
    return loss_sum, grad, hess


def probe_logits(x: Tensor, W: Tensor, chunk_bytes: int = 1 << 22) -> Tensor:
    """Logits (N, K, P, C) of activations x (N, P, F) under weights W (K, P, F + 1, C), in W's dtype; x is
    converted a chunk of probes at a time."""
    N, P, Fd = x.shape
    K, C = W.shape[0], W.shape[-1]
    out = W.new_empty(N, K, P, C)
    step = max(1, chunk_bytes // max(1, N * Fd * W.element_size()))
    for p0 in range(0, P, step):
        p1 = min(P, p0 + step)
        xc, Wc = x[:, p0:p1].transpose(0, 1).to(W.dtype), W[:, p0:p1]  # (Pc, N, F), (K, Pc, F + 1, C)
        Wt = Wc[:, :, :-1].permute(1, 0, 3, 2).reshape(p1 - p0, K * C, Fd)  # outputs as rows, as in newton_stats
        eta = torch.bmm(Wt, xc.transpose(1, 2)).view(p1 - p0, K, C, N)  # (Pc, K, C, N)
        out[:, :, p0:p1] = eta.permute(3, 1, 0, 2) + Wc[:, :, -1]
    return out


def penalised(loss_sum: Tensor, grad: Tensor, W: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """Add l2 / 2 * ||w||^2 (not the intercept) to the objective (K, P) and gradient (K, P, F1, C)."""
    w = W[:, :, :-1]
    g = grad.clone()
    g[:, :, :-1] += l2 * w
    return loss_sum + 0.5 * l2 * w.pow(2).sum((-1, -2)), g


def penalised_hessian(hess: Tensor, F1: int, C: int, l2: float) -> Tensor:
    """Hessian plus the L2 term; a tiny ridge on the intercepts keeps softmax (shift-invariant) solvable."""
    diag = torch.full((F1, C), float(l2), dtype=hess.dtype, device=hess.device)
    diag[-1] = 1e-9 * max(1.0, float(hess.diagonal(dim1=-2, dim2=-1).abs().max()))
    return hess + torch.diag_embed(diag.reshape(-1))


def cholesky_factor(H: Tensor) -> Tensor:
    """Cholesky factors of Hessians H (..., M, M); one that float32 rounding left numerically indefinite gets a
    ridge (relative 1e-10, then 100x more, up to 1e-2) until it factors."""
    if not bool(torch.isfinite(H).all()):
        raise InputError("the probe Hessians hold NaN or inf: check the activations (e.g. fp16 overflow in the store)")
    L_, info = torch.linalg.cholesky_ex(H)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for ridge in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        bad = info != 0
        if not bool(bad.any()):
            break
        Hb = H[bad]
        scale = ridge * Hb.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1)
        L_[bad], info[bad] = torch.linalg.cholesky_ex(Hb + scale[:, None, None] * eye)
    return L_


def fit_newton(x: Tensor, y: Tensor, loss: str, n_classes: int = 2, l2: float = 1.0, tol: float = 1e-8,
               max_steps: int = 50, dtype: torch.dtype = torch.float64) -> tuple[Tensor, dict]:
    """Fit all probes on in-memory data without Lightning (used by k-sparse probing and benchmarks).

    x (N, P, F), y (N, K). Returns W (K, P, F + 1, C) and {"steps", "probe_steps" (the probes solved, summed over
    steps), "hessians" (the probes' Hessians computed), "grad"}."""
    state = NewtonState(y.shape[1], x.shape[1], x.shape[2], n_classes if loss == "softmax" else 1, dtype)
    xp = x.transpose(0, 1).contiguous()  # (P, N, F): each probe's rows in one block
    for step in range(max_steps):
        stats = newton_stats(xp, y, state.W, loss, probes=state.active, n_hessian=state.n_hessian)
        if state.update(*stats, l2=l2, n=len(x), tol=tol):
            break
    return state.W, {"steps": step + 1, "probe_steps": state.probe_steps, "hessians": state.hessians,
                     "grad": state.grad_max}


class NewtonState:
    """Newton's method over epochs for P probes: weights W (K, P, F + 1, C), the last accepted weights and
    objective, and the probes still being solved.

    A probe leaves the active set once the gradient of every label set is below ``tol`` at accepted weights; its
    weights then stay, and later steps compute statistics only for the active probes (a few stragglers take the
    last steps). A probe whose objective rose is halved back towards its last accepted weights instead. A probe
    whose gradient is already below ``chord_below`` (Newton's quadratic phase: its next step mostly confirms
    convergence), or whose last step shrank its gradient by ``chord_ratio`` or more (the Hessian it used still fits),
    reuses its last Hessian's Cholesky factor instead of computing a new Hessian (a chord step); the second step
    always reuses the first Hessian (for logistic loss, at W = 0 it is the Gram matrix / 4, which bounds the Hessian
    everywhere). On bench_probes' data the second rule cuts Hessians from ~3.2 to 1.5-1.8 per probe for 2 more
    steps: 1.1x faster at scale (a), 1.2x at scale (b).
    ``active`` lists the probes that want a new Hessian first: statistics come for ``active`` with Hessians for
    its first ``n_hessian``."""

    def __init__(self, K: int, P: int, Fd: int, C: int, dtype=torch.float64, chord_below: float = 1e-5,
                 chord_ratio: float = 0.1):
        self.W = torch.zeros(K, P, Fd + 1, C, dtype=dtype)
        self.W_prev = torch.zeros_like(self.W)
        self.obj_prev = torch.full((K, P), math.inf, dtype=dtype)
        self.grad = torch.full((K, P), math.inf, dtype=dtype)  # max |gradient of the mean loss| at accepted weights
        self.factor: Tensor | None = None  # (K, P, (F + 1) C, (F + 1) C): Cholesky factor of each probe's last Hessian
        self.active, self.n_hessian = torch.arange(P), P
        self.chord_below, self.chord_ratio = chord_below, chord_ratio
        self.steps = self.probe_steps = self.hessians = 0

    @property
    def grad_max(self) -> float:
        return float(self.grad.max())

    def update(self, loss_sum: Tensor, grad: Tensor, hess: Tensor, l2: float, n: int, tol: float) -> bool:
        """One Newton step (or a backtrack where the objective rose) for the active probes, from their statistics
        (as newton_stats returns them for ``probes=self.active, n_hessian=self.n_hessian``); True once every probe
        has converged."""
        with one_thread():
            return self._update(loss_sum, grad, hess, l2, n, tol)

    def _update(self, loss_sum: Tensor, grad: Tensor, hess: Tensor, l2: float, n: int, tol: float) -> bool:
        idx, nh = self.active.to(self.W.device), self.n_hessian
        W, W_prev, obj_prev = self.W[:, idx], self.W_prev[:, idx], self.obj_prev[:, idx]
        obj, g = penalised(loss_sum, grad, W, l2)
        before = self.grad[:, idx].amax(0)  # (Pa,) gradient before this step
        worse = obj > obj_prev + 1e-12 * obj_prev.abs().clamp_min(1)  # (K, Pa)
        gmax = g.abs().amax((-1, -2)) / n
        self.grad[:, idx] = torch.where(worse, self.grad[:, idx], gmax)
        if nh:
            if self.factor is None:
                self.factor = hess.new_zeros(hess.shape[0], self.W.shape[1], *hess.shape[2:])
            H = penalised_hessian(hess[:, :nh], W.shape[2], W.shape[3], l2)  # newton_stats may give more
            self.factor[:, idx[:nh]] = cholesky_factor(H)
        self.steps += 1
        self.probe_steps += len(idx)
        self.hessians += nh
        move = ~((gmax < tol) & ~worse).all(0)  # (Pa,) probes with a label set not yet converged
        if not move.any():
            self.active, self.n_hessian = self.active[:0], 0
            return True
        W, W_prev, obj_prev, obj, worse, g = (t[:, move] for t in (W, W_prev, obj_prev, obj, worse, g))
        before = before[move]
        moving = idx[move]
        d = torch.cholesky_solve(g.reshape(*g.shape[:2], -1, 1), self.factor[:, moving]).reshape(g.shape)
        back = W_prev + 0.5 * (W - W_prev)
        keep = worse[..., None, None]
        self.W[:, moving] = torch.where(keep, back, W - d)
        self.W_prev[:, moving] = torch.where(keep, W_prev, W)
        self.obj_prev[:, moving] = torch.where(worse, obj_prev, obj)
        active = self.active[move.to(self.active.device)]
        after = self.grad[:, moving].amax(0)
        near = ((after < self.chord_below) | (after < self.chord_ratio * before)).to(active.device)
        self.active, self.n_hessian = torch.cat([active[~near], active[near]]), int((~near).sum())
        return False

    def to(self, device) -> None:
        self.W, self.W_prev, self.obj_prev, self.grad = (t.to(device) for t in (self.W, self.W_prev, self.obj_prev,
                                                                                 self.grad))
        self.factor = None if self.factor is None else self.factor.to(device)

    def state_dict(self) -> dict:
        return {"W": self.W, "W_prev": self.W_prev, "obj_prev": self.obj_prev, "grad": self.grad,
                "factor": self.factor, "active": self.active,
                "counters": torch.tensor([self.steps, self.probe_steps, self.hessians, self.n_hessian])}

    def load_state_dict(self, state: dict) -> None:
        self.W, self.W_prev, self.obj_prev, self.grad = state["W"], state["W_prev"], state["obj_prev"], state["grad"]
        self.factor, self.active = state["factor"], state["active"]
        self.steps, self.probe_steps, self.hessians, self.n_hessian = (int(v) for v in state["counters"])


def resolve_loss(loss: str, label_kind: str, n_labels: int) -> tuple[str, int]:
    """(loss, number of outputs C) for a store's labels."""
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if label_kind == "none":
        raise InputError("this store has no labels (an unlabelled task): train an SAE on it, or extract a labelled "
                         "task")
    if loss == "auto":
        loss = "ridge" if label_kind == "regression" else ("logistic" if n_labels <= 2 else "softmax")
    if loss == "ridge":
        return loss, 1
    if loss == "logistic":
        return loss, 1
    return loss, n_labels
