"""Evaluating sparse autoencoders: reconstruction metrics on stored activations, the feature-density histogram,
and the downstream cost of splicing the reconstruction into the model.

Metrics (over all evaluated tokens, x raw activations (N, d_in)):
    l0          mean number of active latents per token
    fve         1 - sum((x - x_hat)^2) / sum((x - mean(x))^2), mean over the evaluated tokens
    mse         mean over tokens and dimensions of (x - x_hat)^2
    cosine      mean cosine similarity of x and x_hat
    dead_frac   share of latents that never fire on the evaluated tokens
    dense_frac  share of latents firing on more than ``dense_threshold`` of the tokens
CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), with zero- and mean-ablation of the same
heads: 1 means the reconstruction is as good as the real activations, 0 as bad as ablating them.

``python -m headprobe.probes.sae_eval_cli CHECKPOINT --store STORE.h5`` prints the metrics as JSON.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from headprobe import InputError
from headprobe.extract.hooks import head_layout, out_projections
from headprobe.extract.store import Store
from headprobe.extract.tasks.metrics import right_padded


class ReconstructionStats:
    """Accumulates reconstruction metrics batch by batch (float64 sums, so the result is order-independent)."""

    def __init__(self, d_sae: int, dense_threshold: float = 0.1):
        self.dense_threshold = dense_threshold
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.n = 0
        self.sums = {"sse": 0.0, "l0": 0.0, "cos": 0.0}
        self.x_sum = self.x_sq = None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """x, x_hat (B, d_in) raw; f (B, d_sae) latents."""
        x, x_hat = x.double(), x_hat.double()
        active = f > 0
        self.fire_counts += active.sum(0).cpu()
        self.n += len(x)
        self.sums["sse"] += float((x - x_hat).pow(2).sum())
        self.sums["l0"] += float(active.sum())
        self.sums["cos"] += float(F.cosine_similarity(x, x_hat, dim=1).sum())
        xs, xq = x.sum(0).cpu(), x.pow(2).sum(0).cpu()
        self.x_sum = xs if self.x_sum is None else self.x_sum + xs
        self.x_sq = xq if self.x_sq is None else self.x_sq + xq

    def sum_over(self, reduce: Callable[[Tensor], Tensor], d_in: int) -> None:
        """Replace every sum by ``reduce(sum)``, e.g. a sum over DDP ranks, so :meth:`compute` covers all tokens."""
        x_sum = self.x_sum if self.x_sum is not None else torch.zeros(d_in, dtype=torch.float64)
        x_sq = self.x_sq if self.x_sq is not None else torch.zeros(d_in, dtype=torch.float64)
        scalars = torch.tensor([self.n, *self.sums.values()], dtype=torch.float64)
        packed = reduce(torch.cat([self.fire_counts.double(), scalars, x_sum.double(), x_sq.double()]))
        d_sae = len(self.fire_counts)
        self.fire_counts = packed[:d_sae].round().long()
        self.n = int(packed[d_sae].round())
        self.sums = dict(zip(self.sums, packed[d_sae + 1:d_sae + 4].tolist()))
        self.x_sum, self.x_sq = packed[d_sae + 4:d_sae + 4 + d_in], packed[d_sae + 4 + d_in:]

    def compute(self) -> dict:
        if self.n == 0:
            raise InputError("no tokens were evaluated: check the split has rows")
        variance = float((self.x_sq - self.x_sum.pow(2) / self.n).sum())
        density = self.fire_counts.double() / self.n
        return {"n_tokens": self.n, "l0": self.sums["l0"] / self.n, "fve": 1 - self.sums["sse"] / max(variance, 1e-30),
                "mse": self.sums["sse"] / (self.n * len(self.x_sum)), "cosine": self.sums["cos"] / self.n,
                "dead_frac": float((self.fire_counts == 0).double().mean()),
                "dense_frac": float((density > self.dense_threshold).double().mean()),
                "fire_counts": self.fire_counts.clone()}


@torch.no_grad()
def evaluate(sae, batches: Iterable[Tensor], dense_threshold: float = 0.1) -> dict:
    """Reconstruction metrics of ``sae`` over raw input batches, each (B, d_in) or (B, L, H, D)."""
    stats = ReconstructionStats(sae.d_sae, dense_threshold)
    was_training = sae.training
    sae.eval()
    for x in batches:
        x = x.flatten(1).to(sae.W_dec.device)
        f = sae.encode(x)
        stats.update(x, sae.decode(f), f)
    sae.train(was_training)
    return stats.compute()


def store_batches(path: str | Path, split: str = "test", layers: list[int] | None = None,
                  heads: list[int] | None = None, batch_rows: int = 4096,
                  max_rows: int | None = None) -> Iterator[Tensor]:
    """(B, L, H, D) float32 batches of one split of a store, in row order (chunk-aligned reads)."""
    with Store(path) as store:
        rows = store.rows(split)[:max_rows]
        for idx, z in store.iter_blocks(batch_rows, rows):
            z = z[:, layers] if layers is not None else z
            yield torch.from_numpy(z[:, :, heads] if heads is not None else z)


def density_histogram(fire_counts: Tensor, n_tokens: int, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing rates (dead latents counted in the leftmost bar); writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = fire_counts.double().numpy() / max(n_tokens, 1)
    floor = np.log10(1.0 / max(n_tokens, 1)) - 1
    logd = np.where(density > 0, np.log10(np.maximum(density, 1e-30)), floor)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(logd, bins=60, color="#4c72b0")
    ax.axvline(floor + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel(f"log10 firing rate (leftmost bar: never fired, {int((density == 0).sum())} latents)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"feature density over {n_tokens:,} tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- splicing into the model ---------------------------------------------------------------------------------
@contextmanager
def splice(model: torch.nn.Module, layer: int, heads: list[int] | None,
           replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the per-head outputs of ``heads`` (None: all) of ``layer`` during forwards inside the block.

    ``replace`` maps (N, len(heads) * d_head) to the same shape: the selected heads' z of every token,
    concatenated in head order (the SAE's input layout). A forward pre-hook on the output projection.
    """
    layout = head_layout(model)
    H, D = layout.n_heads, layout.d_head
    sel = list(range(H)) if heads is None else list(heads)

    def hook(module, args):
        z = args[0]
        zz = z.reshape(*z.shape[:-1], H, D)
        new = replace(zz[..., sel, :].reshape(-1, len(sel) * D)).to(z.dtype)
        out = zz.clone()
        out[..., sel, :] = new.view(*z.shape[:-1], len(sel), D)
        return (out.reshape(z.shape), *args[1:])

    handle = out_projections(model)[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_batches(sequences: list[list[int]], batch_size: int = 8, pad_id: int = 0
                  ) -> list[tuple[Tensor, Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, (B, S) each."""
    return [tuple(right_padded(sequences[i:i + batch_size], pad_id).values())
            for i in range(0, len(sequences), batch_size)]


def store_sequences(path: str | Path, split: str = "test", max_tokens: int = 16384) -> list[list[int]]:
    """Token sequences of an all-token store's examples in ``split`` (exactly as extracted), up to max_tokens."""
    with Store(path) as store:
        if store.meta.position_rule != "all":
            raise InputError(f"{path} stores only {store.meta.position_rule!r} positions; CE needs an all-token "
                             f"store (extract with --positions all)")
        rows = store.rows(split)
        ex, pos, tok = store.column("example_id")[rows], store.column("position")[rows], store.column("token_id")[rows]
    order = np.lexsort((pos, ex))
    ex, tok = ex[order], tok[order]
    cuts = np.flatnonzero(np.diff(ex)) + 1
    seqs, total = [], 0
    for s in np.split(tok, cuts):
        if total >= max_tokens:
            break
        seqs.append(s.tolist())
        total += len(s)
    return seqs


@torch.no_grad()
def lm_loss(model: torch.nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean next-token cross-entropy over the non-padding tokens of the batches."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum",
                                       ignore_index=-100))
        count += int((target != -100).sum())
    return total / max(count, 1)


def ce_loss_recovered(model: torch.nn.Module, sae, batches: list[tuple[Tensor, Tensor]], mean_input: Tensor,
                      layer: int | None = None, heads: list[int] | None = None,
                      ce_clean: float | None = None) -> dict:
    """CE with the SAE reconstruction spliced in, against the clean model and zero-/mean-ablation.

    ``mean_input`` (d_in,) is the mean SAE input (raw z of the same heads) over training tokens. ``layer`` and
    ``heads`` default to those the SAE was trained on (it must read one layer). ``ce_clean``: the clean model's
    CE on the same batches, if already known.
    """
    layers = sae.layers if layer is None else [layer]
    if layers is None or len(layers) != 1:
        raise InputError("splicing needs an SAE on one layer: pass layer= (SAEs over several layers cannot be "
                         "spliced into one forward)")
    heads = sae.heads if heads is None else heads
    mean_input = mean_input.flatten().float()
    out = {"ce_clean": lm_loss(model, batches) if ce_clean is None else ce_clean}
    variants = {"spliced": lambda z: sae(z.float()),
                "zero_ablation": torch.zeros_like,
                "mean_ablation": lambda z: mean_input.to(z.device).expand(len(z), -1)}
    for name, fn in variants.items():
        with splice(model, layers[0], heads, fn):
            out[f"ce_{name}"] = lm_loss(model, batches)
    for ablation in ("zero", "mean"):
        gap = out[f"ce_{ablation}_ablation"] - out["ce_clean"]
        recovered = out[f"ce_{ablation}_ablation"] - out["ce_spliced"]
        out[f"ce_recovered_{ablation}"] = recovered / gap if gap else float("nan")
    return out


def store_mean(path: str | Path, layers: list[int] | None = None, heads: list[int] | None = None,
               split: str = "train") -> Tensor:
    """Mean SAE input (L' * H' * D,) over one split of a store, read block by block."""
    total, n = None, 0
    for z in store_batches(path, split, layers, heads, batch_rows=16384):
        s = z.double().flatten(1).sum(0)
        total, n = (s if total is None else total + s), n + len(z)
    if not n:
        raise InputError(f"{path} has no {split} rows")
    return (total / n).float()


def evaluate_checkpoint(checkpoint: str | Path, store: str | Path, split: str = "test", max_rows: int | None = None,
                        ce_tokens: int = 0, histogram: str | Path | None = None, model: str | None = None,
                        loaded=None) -> dict:
    """Metrics of a saved SAE on a store's split; with ``ce_tokens``, CE loss recovered on that many tokens."""
    from headprobe.probes.checkpoint import load_local

    sae = load_local(checkpoint)
    cfg = sae.checkpoint_config_loaded
    with Store(store) as s:
        cfg.check_compatible(s.meta)
        slots = [s.meta.layers.index(layer) for layer in cfg.layers]
    metrics = evaluate(sae, store_batches(store, split, slots, cfg.heads, max_rows=max_rows))
    counts = metrics.pop("fire_counts")
    if histogram:
        density_histogram(counts, metrics["n_tokens"], histogram)
    if ce_tokens:
        if loaded is None:
            from headprobe.extract.models import load_model

            loaded = load_model(model or cfg.model_id)
        from headprobe.extract.capabilities import capabilities_of

        why = capabilities_of(loaded).missing(("causal_lm",))
        if why:
            raise InputError(f"--ce_tokens {ce_tokens}: CE loss recovered needs next-token logits, and {why}: pass "
                             f"--ce_tokens 0")
        batches = token_batches(store_sequences(store, split, ce_tokens))
        metrics.update(ce_loss_recovered(loaded.model, sae, batches, store_mean(store, slots, cfg.heads)))
    return metrics
