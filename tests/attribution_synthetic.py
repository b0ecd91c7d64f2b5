"""Synthetic per-head activations with planted heads, and small reference fits, for the attribution tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

L, H, D = 4, 4, 8
# stage -> heads its tasks' labels are written into (distinct per stage)
PLANTED = {"KR": [(0, 1)], "ICI": [(1, 2)], "LR": [(2, 0), (3, 3)], "EP": [(3, 1)]}
TASKS = {"kr_a": "KR", "kr_b": "KR", "ici": "ICI", "lr": "LR", "ep": "EP"}


@dataclass
class SyntheticTask:
    name: str
    stage: str
    z: np.ndarray  # (N, L, H, D)
    labels: np.ndarray  # (N,)
    train: np.ndarray  # row indices
    val: np.ndarray


def make_tasks(n: int = 600, amplitude: float = 2.0, flip: float = 0.15, seed: int = 0) -> list[SyntheticTask]:
    """Per-head z as a sparse code over head-local atoms (shared by all tasks) plus small noise; each task's binary
    label switches on a task-specific atom in every planted head of its stage (present for label 1), each head
    independently wrong for a ``flip`` share of rows (so heads of one stage complement each other)."""
    rng = np.random.default_rng(seed)
    unit = lambda *shape: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(rng.normal(size=(*shape, D)))
    atoms = unit(L, H, 4)  # (L, H, atoms, D), the "model's" features
    label_atoms = {name: unit(L, H) for name in TASKS}
    out = []
    for name, stage in TASKS.items():
        code = rng.random((n, L, H, 4)) < 0.15
        z = np.einsum("nlha,lhad->nlhd", code * (1 + rng.exponential(size=code.shape)), atoms)
        z += 0.2 * rng.normal(size=z.shape)
        y = rng.integers(0, 2, n)
        for layer, head in PLANTED[stage]:
            on = y ^ (rng.random(n) < flip)
            z[:, layer, head] += np.outer(on * amplitude, label_atoms[name][layer, head])
        perm = rng.permutation(n)
        out.append(SyntheticTask(name, stage, z, y, perm[: n * 2 // 3], perm[n * 2 // 3:]))
    return out


def per_head_logistic(z: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Reference recipe: one sklearn logistic regression per (layer, head); val accuracy (L, H)."""
    from sklearn.linear_model import LogisticRegression

    acc = np.zeros(z.shape[1:3])
    for layer in range(z.shape[1]):
        for head in range(z.shape[2]):
            clf = LogisticRegression(max_iter=1000).fit(z[train, layer, head], y[train])
            acc[layer, head] = clf.score(z[val, layer, head], y[val])
    return acc


def group_lasso(z: np.ndarray, y: np.ndarray, lam: float = 0.04, steps: int = 400, lr: float = 0.5) -> np.ndarray:
    """Logistic regression with one group per head, by proximal gradient (exact zeros): weights (L, H, D)."""
    x = torch.as_tensor(z, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1:], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.einsum("nlhd,lhd->n", x, w) + b, t)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
            norms = w.norm(dim=-1, keepdim=True)
            w *= (1 - lr * lam / norms.clamp_min(1e-12)).clamp_min(0)
    return w.detach().numpy()


def topk_sae(x: np.ndarray, d_sae: int = 32, k: int = 4, steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small TopK SAE fitted to x (N, d_in) with Adam; W_enc (d_in, F), W_dec (F, d_in), b_enc (F,), b_dec (d_in,)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    d_in = x.shape[1]
    W_dec = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=1))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(x.mean(0).clone())
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-2)
    for _ in range(steps):
        f = topk_activations((x - b_dec) @ W_enc + b_enc, k)
        loss = ((f @ W_dec + b_dec - x) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {k_: v.detach() for k_, v in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items()}


def topk_activations(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def planted_map() -> dict[tuple[int, int], str]:
    return {head: stage for stage, heads in PLANTED.items() for head in heads}


def lda_accuracy(z: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Closed-form linear probes (shrunk LDA), one per (layer, head), all at once: val accuracy (L, H)."""
    x = torch.as_tensor(z, dtype=torch.float64).flatten(1, 2).transpose(0, 1)  # (G, N, D)
    t = torch.as_tensor(y)
    xt, tt = x[:, train], t[train]
    mu1, mu0 = xt[:, tt == 1].mean(1), xt[:, tt == 0].mean(1)  # (G, D)
    centred = torch.cat([xt[:, tt == 1] - mu1[:, None], xt[:, tt == 0] - mu0[:, None]], dim=1)
    cov = centred.transpose(1, 2) @ centred / centred.shape[1] + ridge * torch.eye(x.shape[2], dtype=x.dtype)
    w = torch.linalg.solve(cov, (mu1 - mu0)[..., None])[..., 0]  # (G, D)
    b = -(w * (mu1 + mu0) / 2).sum(-1)
    pred = (torch.einsum("gnd,gd->gn", x[:, val], w) + b[:, None]) > 0
    return (pred == t[val].bool()).double().mean(1).view(z.shape[1], z.shape[2]).numpy()
