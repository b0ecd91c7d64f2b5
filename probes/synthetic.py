"""Ground-truth worlds for sparse autoencoders: activations built from known feature directions, so an SAE's latents
can be checked against the features that made the data (the setting of SynthSAEBench, Chanin & Garriga-Alonso 2026,
arXiv 2602.14687; this generator is headprobe's own).

A world holds F unit feature directions ``directions`` (F, d) and draws rows ``x = sum_i a_i d_i + bias`` with
magnitudes ``a_i ~ max(0.1, 1 + magnitude_std * N(0, 1))`` for the features that fire. What fires:

    top-level features   the features that are no one's child (free features and the roots of the trees); feature
                         i fires with probability ``p_i`` (Zipfian over a random ranking: ``p_max`` down to
                         ``p_min`` with exponent ``zipf_exponent``, all scaled so that the expected number of firing
                         features per row is ``true_l0``), through a Gaussian copula: i fires when
                         ``g_i = U_i . z + sqrt(1 - c_i) e_i < Phi^-1(p_i)``, z (rank,) and e_i standard normal,
                         U (F, rank) with row norms^2 c_i = ``corr_strength``, so the latent Gaussians correlate
                         by ``U_i . U_j`` (low rank)
    hierarchy            ``n_roots`` trees of ``branching`` children per node and ``depth`` levels (root included);
                         a child fires only when its parent fires, and at most one child of a firing parent fires
                         (siblings are mutually exclusive): child c with probability ``q_c``, none with
                         ``1 - sum q``; ``q`` over siblings follows their Zipfian ranks, summing to ``child_fire``
    superposition        random directions pushed apart until the mean over features of the largest |cos| to any
                         other feature is at most ``mean_max_cos`` (a target below that of random directions is
                         reached by gradient steps on the pairwise |cos| above a moving level)

``World.expected_l0()`` is exact (marginals do not depend on the copula); :meth:`World.sample` returns the rows and
the truth as CSR (row pointers, feature indices, magnitudes). Two named worlds: :func:`synthsae_config` (hierarchy,
correlations, 4,096 features in 576 dims, true L0 16) and :func:`independent_config` (the same without either).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headprobe import InputError


@dataclass
class WorldConfig:
    """Settings of a ground-truth world (see the module docstring)."""

    n_features: int = 4096
    d: int = 576
    true_l0: float = 16.0
    zipf_exponent: float = 0.5
    p_max: float = 0.4
    p_min: float = 5e-4
    n_roots: int = 32
    branching: int = 4
    depth: int = 3
    child_fire: float = 0.8
    corr_rank: int = 25
    corr_strength: float = 0.5
    mean_max_cos: float = 0.15
    magnitude_std: float = 0.15
    bias_norm: float = 1.0
    seed: int = 0

    def check(self) -> None:
        tree = self.n_roots * sum(self.branching ** level for level in range(self.depth))
        checks = [(self.n_features >= 2, "n_features must be at least 2"), (self.d >= 2, "d must be at least 2"),
                  (tree <= self.n_features, f"the trees hold {tree} features, more than n_features"),
                  (0 < self.p_min <= self.p_max <= 1, "need 0 < p_min <= p_max <= 1"),
                  (0 <= self.child_fire <= 1, "child_fire must be in [0, 1]"),
                  (0 <= self.corr_strength < 1, "corr_strength must be in [0, 1)"),
                  (self.true_l0 > 0, "true_l0 must be positive"), (0 < self.mean_max_cos <= 1, "mean_max_cos in (0, 1]")]
        for ok, why in checks:
            if not ok:
                raise InputError(f"world settings: {why}")


def synthsae_config(**changes) -> WorldConfig:
    """The SynthSAEBench-shaped world of the benchmark: hierarchy, correlated firing, superposition at 0.15."""
    return WorldConfig(**changes)


def independent_config(**changes) -> WorldConfig:
    """The same world with independent features: no trees, no correlation."""
    return WorldConfig(**{"n_roots": 0, "corr_rank": 0, "corr_strength": 0.0, **changes})


def mean_max_abs_cos(directions: Tensor, block: int = 2048) -> float:
    """Mean over rows of the largest |cos| to any other row; directions (F, d) unit rows."""
    return float(max_abs_cos(directions, block).mean())


def max_abs_cos(directions: Tensor, block: int = 2048) -> Tensor:
    """(F,) largest |cos| of each unit row to any other row."""
    out = torch.empty(len(directions))
    for i in range(0, len(directions), block):
        g = (directions[i:i + block] @ directions.T).abs_()
        g[torch.arange(len(g)), torch.arange(i, i + len(g))] = 0
        out[i:i + block] = g.max(1).values
    return out


def spread_directions(n: int, d: int, target: float, gen: torch.Generator, max_iters: int = 300) -> Tensor:
    """n random unit directions in d dims, pushed apart until their mean max |cos| is at most ``target``.

    Each step lowers sum over pairs of relu(|cos| - level)^2, the level the current mean max |cos| less a margin,
    so the largest overlaps move first; rows are renormalised after every step."""
    D = torch.randn(n, d, generator=gen)
    D /= D.norm(dim=1, keepdim=True)
    for _ in range(max_iters):
        now = mean_max_abs_cos(D)
        if now <= target:
            break
        level = max(0.0, target - 0.5 * (now - target) - 0.02)
        G = D @ D.T
        G.fill_diagonal_(0)
        S = torch.sign(G) * (G.abs() - level).clamp_min(0)
        D -= 0.5 * (S @ D) / max(1.0, float(S.abs().sum(1).mean()))
        D /= D.norm(dim=1, keepdim=True)
    return D


@dataclass
class World:
    """A drawn world: directions (F, d); top (T,) top-level feature indices with thresholds (T,) on their copula
    Gaussians and loadings U (T, rank); children (P, branching) feature indices of each parent in ``parents``
    (P,) (-1: none) with cumulative choice probabilities cum_q (P, branching); bias (d,)."""

    config: WorldConfig
    directions: Tensor
    p: Tensor  # (F,) marginal firing probability of every feature
    top: Tensor
    U: Tensor
    parents: Tensor
    children: Tensor
    cum_q: Tensor
    parent_of: Tensor  # (F,) parent index, -1 for top-level features
    bias: Tensor

    def expected_l0(self) -> float:
        return float(self.p.sum())

    @property
    def thresholds(self) -> Tensor:
        return torch.distributions.Normal(0.0, 1.0).icdf(self.p[self.top].clamp(1e-12, 1 - 1e-7))

    def sample(self, n: int, seed: int, chunk: int = 8192) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """n rows: x (n, d) float32 and the truth as CSR: crow (n + 1,), feature (nnz,), magnitude (nnz,)."""
        gen = torch.Generator().manual_seed(seed)
        xs, feats, mags, counts = [], [], [], []
        for start in range(0, n, chunk):
            B = min(chunk, n - start)
            rows, f, a = self._draw(B, gen)
            count = torch.bincount(rows, minlength=B)
            offsets = torch.cat([count.new_zeros(1), count.cumsum(0)[:-1]])
            xs.append(F.embedding_bag(f, self.directions, offsets, mode="sum", per_sample_weights=a) + self.bias)
            feats.append(f)
            mags.append(a)
            counts.append(count)
        crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
        return torch.cat(xs), crow, torch.cat(feats), torch.cat(mags)

    def _draw(self, B: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Firing features of B rows as (row, feature, magnitude) triples, sorted by row then feature."""
        g = torch.randn(B, len(self.top), generator=gen)
        if self.U.shape[1]:
            c = self.U.pow(2).sum(1)
            g = g * (1 - c).sqrt() + torch.randn(B, self.U.shape[1], generator=gen) @ self.U.T
        rows, col = (g < self.thresholds).nonzero(as_tuple=True)
        rows, feats = [rows], [self.top[col]]
        level_rows, level_feats = rows[0], feats[0]
        slot = torch.full((len(self.parent_of),), -1, dtype=torch.long)
        slot[self.parents] = torch.arange(len(self.parents))
        while len(level_rows) and len(self.parents):
            s = slot[level_feats]
            has = s >= 0
            r, s = level_rows[has], s[has]
            u = torch.rand(len(s), generator=gen)
            pick = (u[:, None] >= self.cum_q[s]).sum(1)  # index of the chosen child, branching: none
            keep = pick < self.children.shape[1]
            level_rows, level_feats = r[keep], self.children[s[keep], pick[keep]]
            rows.append(level_rows)
            feats.append(level_feats)
        rows, feats = torch.cat(rows), torch.cat(feats)
        order = torch.argsort(rows * len(self.parent_of) + feats)
        rows, feats = rows[order], feats[order]
        a = (1 + self.config.magnitude_std * torch.randn(len(feats), generator=gen)).clamp_min(0.1)
        return rows, feats, a


def zipf_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> Tensor:
    """(n,) probabilities by rank: p_max at rank 0 down to p_min at rank n - 1, shaped (rank + 1)^-exponent."""
    r = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    lo = r[-1]
    return (p_min + (p_max - p_min) * (r - lo) / (1 - lo).clamp_min(1e-12)) if n > 1 else torch.tensor([p_max]).double()


def _trees(cfg: WorldConfig, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """parent_of (F,), parents (P,), children (P, branching): tree nodes are the features at positions perm[:size]."""
    F, b = cfg.n_features, cfg.branching
    parent_of = torch.full((F,), -1, dtype=torch.long)
    if not cfg.n_roots or cfg.depth < 2:
        return parent_of, torch.zeros(0, dtype=torch.long), torch.zeros(0, max(b, 1), dtype=torch.long)
    level, used, parents, children = perm[:cfg.n_roots], cfg.n_roots, [], []
    for _ in range(cfg.depth - 1):
        kids = perm[used:used + len(level) * b].view(len(level), b)
        used += kids.numel()
        parent_of[kids] = level[:, None].expand_as(kids)
        parents.append(level)
        children.append(kids)
        level = kids.flatten()
    return parent_of, torch.cat(parents), torch.cat(children)


def make_world(cfg: WorldConfig) -> World:
    """Draw a world from its settings (directions, ranks, trees, correlations), deterministic in ``cfg.seed``."""
    cfg.check()
    gen = torch.Generator().manual_seed(cfg.seed)
    F = cfg.n_features
    directions = spread_directions(F, cfg.d, cfg.mean_max_cos, gen)
    perm = torch.randperm(F, generator=gen)
    parent_of, parents, children = _trees(cfg, perm)
    base = torch.empty(F, dtype=torch.float64)
    base[torch.randperm(F, generator=gen)] = zipf_probabilities(F, cfg.zipf_exponent, cfg.p_max, cfg.p_min)
    q = base[children] if len(parents) else base.new_zeros(0, max(cfg.branching, 1))
    q = cfg.child_fire * q / q.sum(1, keepdim=True).clamp_min(1e-300)
    top = (parent_of < 0).nonzero().squeeze(1)
    subtree = _subtree_sizes(F, parents, children, q)
    scale = _scale_for_l0(base[top], subtree[top], cfg.true_l0)
    p = torch.zeros(F, dtype=torch.float64)
    p[top] = (scale * base[top]).clamp(max=1.0)
    for s in range(len(parents)):  # parents are listed level by level, so p[parent] is set before its children
        p[children[s]] = p[parents[s]] * q[s]
    U = torch.randn(len(top), cfg.corr_rank, generator=gen)
    if cfg.corr_rank:
        U *= math.sqrt(cfg.corr_strength) / U.norm(dim=1, keepdim=True)
    bias = torch.randn(cfg.d, generator=gen)
    bias *= cfg.bias_norm / bias.norm()
    cum_q = q.cumsum(1).float()
    return World(cfg, directions, p.float(), top, U, parents, children, cum_q, parent_of, bias)


def _subtree_sizes(F: int, parents: Tensor, children: Tensor, q: Tensor) -> Tensor:
    """(F,) expected number of firing features in each feature's subtree given that the feature fires."""
    size = torch.ones(F, dtype=torch.float64)
    for s in reversed(range(len(parents))):  # deepest parents first
        size[parents[s]] = 1 + (q[s] * size[children[s]]).sum()
    return size


def _scale_for_l0(base: Tensor, subtree: Tensor, target: float) -> float:
    """The scale s with sum_i min(1, s base_i) subtree_i = target (bisection); refuses an unreachable target."""
    most = float(subtree.sum())
    if target >= most:
        raise InputError(f"world settings: true_l0 {target} is out of reach (at most {most:.1f} with every "
                         f"top-level feature always firing): lower true_l0 or add features")
    lo, hi = 0.0, 1.0
    while float((hi * base).clamp(max=1) @ subtree) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((mid * base).clamp(max=1) @ subtree) < target else (lo, mid)
    return hi


def world_summary(world: World) -> dict:
    """The settings and what they gave: measured mean max |cos|, expected L0, features in trees."""
    return {**asdict(world.config), "measured_mean_max_cos": mean_max_abs_cos(world.directions),
            "expected_l0": world.expected_l0(),
            "tree_features": int((world.parent_of >= 0).sum()) + (world.config.n_roots if len(world.parents) else 0)}
