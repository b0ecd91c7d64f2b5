"""Inference-time intervention (Li et al. 2023, arXiv 2306.03341, "Inference-Time Intervention: Eliciting
Truthful Answers from a Language Model"): steer a model by shifting chosen heads' outputs along probe directions.

For each chosen head h, at the input of the attention output projection (z, the head's block of W_O's input; see
:mod:`headprobe.extract.hooks`)::

    z_h  <-  z_h + alpha * sigma_h * theta_h

``theta_h`` is the head's unit direction: the mass-mean of the probe's classes (mean z of class 1 minus mean z of
class 0, the ITI default) or the probe's weight; ``sigma_h`` is the standard deviation of the training activations
projected on ``theta_h``; ``alpha`` sets the strength (positive: towards class 1). The heads are the top K by the
probe's held-out (val) accuracy, ties broken by its val loss. The shift enters the residual stream as
``alpha * sigma_h * theta_h @ W_O[h]``, at every position (``position="all"``, ITI's generation setting) or only
at each sequence's last token (``"last"``).

    intervention = headprobe.load("v1/capitals-steer")         # an Intervention checkpoint
    with probes.steer(model, intervention):                  # model: a Hugging Face model of a supported family
        out = model(**batch)

:class:`Intervention` is saved in the checkpoint format of :mod:`.checkpoint`; :func:`build_intervention` makes one
from a trained :class:`~headprobe.probes.linear.LinearProbes` checkpoint and its training store.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headprobe import InputError
from headprobe.extract.hooks import head_layout, out_projections
from headprobe.probes.checkpoint import CheckpointConfig, PretrainedMixin, register
from headprobe.probes.hub import FromPretrained

DIRECTIONS = ("mass_mean", "probe")
POSITIONS = ("all", "last")
Head = tuple[int, int]  # (layer, head)


class HeadSteering:
    """Context manager: while active, ``shift`` (L, H, D) is added to every head's z (zeros leave a head alone), at
    all positions or only at each sequence's last token (the last one the attention mask keeps). One forward
    pre-hook per layer with a nonzero shift, vectorised over heads."""

    def __init__(self, model: nn.Module, shift: torch.Tensor, position: str = "all"):
        if position not in POSITIONS:
            raise InputError(f"steering position {position!r}: choose 'all' or 'last'")
        self.layout = layout = head_layout(model)
        expected = (layout.n_layers, layout.n_heads, layout.d_head)
        if tuple(shift.shape) != expected:
            raise InputError(f"the steering shift has shape {tuple(shift.shape)}, the model's heads {expected} "
                             f"(layers, heads, d_head): build the intervention for this model")
        self.position, self._mask = position, None
        flat = shift.detach().reshape(layout.n_layers, -1)  # (L, H * D)
        proj = out_projections(model)
        layers = torch.nonzero(flat.abs().sum(1) > 0).flatten().tolist()
        self._handles = [proj[layer].register_forward_pre_hook(self._hook(flat[layer])) for layer in layers]
        if position == "last":
            base = model.base_model
            self._mask_index = _argument_index(base, "attention_mask")
            self._handles.append(base.register_forward_pre_hook(self._remember_mask, with_kwargs=True))

    def _remember_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_index is not None and len(args) > self._mask_index:
            mask = args[self._mask_index]
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def last_positions(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """(B,) index of each sequence's last kept token: from the attention mask of the current forward, or the
        last position where there is none (or it covers cached tokens too, as during generation)."""
        mask = self._mask
        if mask is None or tuple(mask.shape) != (batch, seq):
            return torch.full((batch,), seq - 1, device=device)
        return seq - 1 - mask.to(device).flip(1).ne(0).int().argmax(1)

    def _hook(self, flat: torch.Tensor):
        def hook(module, args):
            x = args[0]  # (B, S, H * D)
            add = flat.to(x.device, x.dtype)
            if self.position == "all":
                return (x + add, *args[1:])
            last = self.last_positions(x.shape[0], x.shape[1], x.device)
            at = torch.nn.functional.one_hot(last, x.shape[1]).to(x.dtype)  # (B, S)
            return (x + at[..., None] * add, *args[1:])
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "HeadSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _argument_index(module: nn.Module, name: str) -> int | None:
    params = list(inspect.signature(module.forward).parameters)
    return params.index(name) if name in params else None


def shift_table(n_layers: int, n_heads: int, heads: list[Head] | torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(L, H, D) shifts: ``vectors`` (K, D) at ``heads`` (K pairs (layer, head), distinct), zeros elsewhere."""
    heads = torch.as_tensor(heads, dtype=torch.long).reshape(-1, 2)
    if len(heads) != len(vectors):
        raise InputError(f"{len(heads)} heads but {len(vectors)} shift vectors: pass one vector per head")
    if len({tuple(h) for h in heads.tolist()}) != len(heads):
        raise InputError(f"the steered heads {heads.tolist()} name a head twice: pass distinct (layer, head) pairs")
    bad = [h for h in heads.tolist() if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise InputError(f"head {tuple(bad[0])} is outside the model's {n_layers} layers x {n_heads} heads")
    out = torch.zeros(n_layers, n_heads, vectors.shape[-1], dtype=torch.float32)
    out[heads[:, 0], heads[:, 1]] = vectors.float()
    return out


@register
class Intervention(PretrainedMixin, FromPretrained, nn.Module):
    """K heads, each with a unit direction and the spread of its activations along it; ``alpha`` the strength.

    Buffers: ``heads`` (K, 2) (layer, head) in model numbering, ``direction`` (K, D) unit vectors, ``sigma`` (K,).
    ``forward(z)`` applies the shift to stored activations (B, L, H, D) over all of the model's layers.
    """

    def __init__(self, n_layers: int, n_heads: int, d_head: int, k: int, alpha: float = 5.0,
                 direction: str = "mass_mean", position: str = "all"):
        super().__init__()
        if direction not in DIRECTIONS or position not in POSITIONS:
            raise InputError(f"intervention direction {direction!r}, position {position!r}: choose a direction from "
                             f"{', '.join(DIRECTIONS)} and a position from {', '.join(POSITIONS)}")
        self.hparams = dict(n_layers=n_layers, n_heads=n_heads, d_head=d_head, k=k, alpha=float(alpha),
                            direction=direction, position=position)
        self.register_buffer("heads", torch.zeros(k, 2, dtype=torch.long))
        self.register_buffer("direction", torch.zeros(k, d_head))
        self.register_buffer("sigma", torch.zeros(k))

    @property
    def alpha(self) -> float:
        return self.hparams["alpha"]

    def head_list(self) -> list[Head]:
        return [tuple(h) for h in self.heads.tolist()]

    def shift(self, alpha: float | None = None) -> torch.Tensor:
        """(L, H, D): alpha * sigma_h * theta_h at the chosen heads, zeros elsewhere."""
        a = self.alpha if alpha is None else float(alpha)
        hp = self.hparams
        return shift_table(hp["n_layers"], hp["n_heads"], self.heads, a * self.sigma[:, None] * self.direction)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Stored activations (B, L, H, D) with the shift added."""
        return z + self.shift().to(z.device, z.dtype)

    def checkpoint_config(self, probe_config: CheckpointConfig, command: str = "") -> CheckpointConfig:
        """The probe's provenance (model, hook point, task, store), with this class and its hyperparameters."""
        return replace(probe_config, cls=type(self).__name__, hparams=dict(self.hparams), heads=None,
                       normalisation={}, command=command, tensors_sha256="")


def steer(model: nn.Module, intervention: Intervention | torch.Tensor, alpha: float | None = None,
          position: str | None = None) -> HeadSteering:
    """Context manager that steers ``model`` (a Hugging Face model of a supported family) with ``intervention``
    (an :class:`Intervention`, or a shift table (L, H, D)); ``alpha`` and ``position`` override the
    intervention's own. Batched; hooks are removed on exit."""
    if isinstance(intervention, Intervention):
        return HeadSteering(model, intervention.shift(alpha), position or intervention.hparams["position"])
    shift = torch.as_tensor(intervention)
    return HeadSteering(model, shift * (1.0 if alpha is None else float(alpha)), position or "all")


# --- building an intervention from a probe checkpoint and its training store -----------------------------------
def probe_directions(probe, direction: str = "mass_mean") -> torch.Tensor:
    """Unit directions (L', H', D) of every head a LinearProbes checkpoint read (its layers and heads): the
    mass-mean of its classes, or its weight (per-head logistic probes of a binary task)."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction {direction!r}: choose from {', '.join(DIRECTIONS)}")
    hp = probe.hparams
    if hp.get("scope", "head") != "head" or hp.get("loss") != "logistic":
        raise InputError(f"steering needs per-head logistic probes of a binary task (this checkpoint: scope "
                         f"{hp.get('scope')!r}, loss {hp.get('loss')!r}): train `headprobe train linear` on a "
                         f"two-class task")
    if direction == "mass_mean":
        if getattr(probe, "mass_mean", None) is None:
            raise InputError("this probe checkpoint holds no mass-mean directions: retrain it, or pass --direction "
                             "probe")
        theta = probe.mass_mean["direction"].float()
    else:
        W = probe.newton.W[0, :, :-1, 0].float()  # (P, D): the weight without its bias
        theta = W.reshape(hp["n_layers"], hp["n_groups"], -1)
    return theta / theta.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def head_ranking(metrics: dict, layers: list[int], heads: list[int]) -> list[Head]:
    """Every head the probe read, best first: by val accuracy of the task's probes (``metrics["val"]["acc"][0]``,
    (L', H')), ties by lower val loss, then by position."""
    try:
        acc = np.asarray(metrics["val"]["acc"][0], dtype=np.float64)
        loss = np.asarray(metrics["val"].get("loss", [np.zeros_like(acc)])[0], dtype=np.float64)
    except (KeyError, TypeError, IndexError):
        raise InputError("the probe checkpoint's metrics.json holds no per-head val accuracy "
                         "(metrics['val']['acc']): steer with a LinearProbes checkpoint of `headprobe train linear`")
    order = np.lexsort((np.arange(acc.size), np.nan_to_num(loss.ravel(), nan=np.inf),
                        -np.nan_to_num(acc.ravel(), nan=-np.inf)))
    return [(layers[i // acc.shape[1]], heads[i % acc.shape[1]]) for i in order]


def projection_std(store, theta: torch.Tensor, layers: list[int], heads: list[int],
                   split: str = "train") -> torch.Tensor:
    """(L', H') standard deviation (ddof 0, as ITI's ``np.std``) of ``split``'s activations in ``store`` projected on
    ``theta`` (L', H', D), for the model layers ``layers`` and heads ``heads`` that theta covers; read by blocks."""
    rows = store.rows(split)
    if len(rows) < 2:
        raise InputError(f"{store.path} has {len(rows)} {split} rows: sigma needs at least 2 (extract more examples)")
    missing = sorted(set(layers) - set(store.meta.layers))
    if missing:
        raise InputError(f"{store.path} holds no layers {missing}: extract the probe's layers")
    slots = [list(store.meta.layers).index(layer) for layer in layers]
    t = theta.double().numpy()
    total = np.zeros(t.shape[:2])
    total_sq = np.zeros_like(total)
    for _, z in store.iter_blocks(rows=rows):
        proj = np.einsum("nlhd,lhd->nlh", z[:, slots][:, :, heads].astype(np.float64), t)
        total += proj.sum(0)
        total_sq += (proj ** 2).sum(0)
    mean = total / len(rows)
    return torch.from_numpy(np.sqrt(np.clip(total_sq / len(rows) - mean ** 2, 0, None))).float()


def open_probe(probe):
    """A LinearProbes module from a reference (folder, registry id, hub repo) or as given."""
    if isinstance(probe, (str, Path)):
        from headprobe.probes.hub import load

        probe = load(probe)
    if type(probe).__name__ != "LinearProbes" or not hasattr(probe, "checkpoint_config_loaded"):
        raise InputError("an intervention is built from a LinearProbes checkpoint (loaded with headprobe.load): pass "
                         "its folder or registry id")
    return probe


def build_intervention(probe, store, k: int = 8, alpha: float = 5.0, direction: str = "mass_mean",
                       position: str = "all", heads: list[Head] | None = None) -> Intervention:
    """ITI's intervention from a LinearProbes checkpoint (module or reference) and its training store (an open
    :class:`~headprobe.extract.store.Store`): the top ``k`` heads by the probe's val accuracy (or ``heads``), each
    with its unit direction and the std of the store's train activations along it."""
    probe = open_probe(probe)
    cfg = probe.checkpoint_config_loaded
    cfg.check_compatible(store.meta)
    if store.meta.task != cfg.task or store.meta.dataset_hash != cfg.data.get("dataset_hash", store.meta.dataset_hash):
        raise InputError(f"{store.path} holds task {store.meta.task!r} (data {store.meta.dataset_hash}), the probe "
                         f"was trained on {cfg.task!r} (data {cfg.data.get('dataset_hash')}): pass the probe's "
                         f"training store")
    head_ids = list(range(cfg.n_heads)) if cfg.heads is None else list(cfg.heads)
    ranking = head_ranking(probe.checkpoint_metrics_loaded, cfg.layers, head_ids)
    chosen = [tuple(h) for h in heads] if heads is not None else ranking[:k]
    if not 0 < (len(chosen) if heads is not None else k) <= len(ranking):
        raise InputError(f"--k {k}: steer between 1 and {len(ranking)} heads (the probe read {len(ranking)})")
    unknown = sorted(set(chosen) - set(ranking))
    if unknown:
        raise InputError(f"head {unknown[0]} was not read by the probe: steer heads of its layers {cfg.layers}")
    theta = probe_directions(probe, direction)  # (L', H', D)
    sigma = projection_std(store, theta, cfg.layers, head_ids)
    idx = [(cfg.layers.index(layer), head_ids.index(head)) for layer, head in chosen]
    rows, cols = torch.tensor(idx).T
    n_layers = store.meta.n_layers
    module = Intervention(n_layers, cfg.n_heads, cfg.d_head, len(chosen), alpha, direction, position)
    module.heads.copy_(torch.tensor(chosen))
    module.direction.copy_(theta[rows, cols])
    module.sigma.copy_(sigma[rows, cols])
    return module
