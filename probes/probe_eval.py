"""The evaluation plumbing shared by the probes trained with Lightning (:mod:`~headprobe.probes.linear`,
:mod:`~headprobe.probes.sparse`): where the data came from, the loss for its labels, and val/test hooks that gather
every rank's rows in store order before scoring them."""
from __future__ import annotations

import numpy as np
import torch

from headprobe import InputError
from headprobe.probes.newton import resolve_loss
from headprobe.train.lightning_api import keep_module_unwrapped


class SplitEval:
    """Shared probe plumbing: the data's provenance, and Lightning eval hooks that call ``_collect(batch)`` per
    val/test batch and ``_evaluate(split, outputs)`` at epoch end."""

    def _bind(self, dm) -> tuple[str, int]:
        """Record where the data came from; (loss, number of outputs) for its labels."""
        self.meta, self.layers, self.heads = dm.meta, dm.model_layers, dm.heads
        if not any(p.requires_grad for p in self.parameters()):
            # Data-parallel (DDP): the solvers sum statistics over ranks themselves; torch's DDP wrapper has no
            # gradients to synchronise and refuses such modules, so Lightning runs them unwrapped (as in eval).
            keep_module_unwrapped(self.trainer.strategy)
        if not len(dm.split_rows["val"]):
            raise InputError(f"{dm.path}: the val split holds no rows ({sum(map(len, dm.split_rows.values()))} rows in "
                             f"all; splits go 60/20/20 by group): extract more examples")
        if dm.meta.label_kind == "class":
            seen = np.unique(dm.columns()["label"][dm.split_rows["train"]])
            if len(seen) < 2:
                raise InputError(f"{dm.path}: every training row has the label {dm.meta.label_names[seen[0]]!r}: a "
                                 f"probe needs rows of two labels or more (check the task's labels)")
        return resolve_loss(self.hparams.loss, dm.meta.label_kind, len(dm.meta.label_names))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._outputs.setdefault("val", []).append(self._collect(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._outputs.setdefault("test", []).append(self._collect(batch))

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, split: str) -> None:
        outs = self._outputs.pop(split, [])
        if self.trainer.world_size > 1:
            outs = [self._gather_rows(outs)]
        if outs and isinstance(outs[0], dict) and "row" in outs[0]:
            # store-row order, whatever the ranks and workers: bootstrap resamples then see the same rows in the
            # same order (streamed data deals blocks to dataloader workers and ranks in turn)
            rows = torch.cat([o["row"] for o in outs])
            order = torch.argsort(rows, stable=True)
            outs = [{k: torch.cat([o[k] for o in outs])[order] for k in outs[0]}]
        if outs:
            self._evaluate(split, outs)

    def _sum_over_ranks(self, value):
        """A tensor, number, tuple of them or None, summed over ranks (unchanged in one process)."""
        if self.trainer.world_size == 1 or value is None:
            return value
        if isinstance(value, tuple):
            return tuple(self._sum_over_ranks(v) for v in value)
        t = torch.as_tensor(value, device=self.device).clone()
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _gather_rows(self, outs: list) -> dict | tuple:
        """Per-batch outputs (dicts or tuples of (N, ...) tensors) of every rank, concatenated in rank order (shares
        may differ in size, so they are padded to gather). :meth:`_score` then sorts them by store row."""
        strategy = self.trainer.strategy
        keys = list(outs[0]) if outs and isinstance(outs[0], dict) else list(range(len(outs[0]) if outs else 0))
        counts = strategy.all_gather(torch.tensor(sum(len(o[keys[0]]) for o in outs) if outs else 0,
                                                  device=self.device)).cpu()
        gathered = {}
        for k in keys:
            t = torch.cat([o[k] for o in outs])
            pad = t.new_zeros((int(counts.max()) - len(t), *t.shape[1:]))
            g = strategy.all_gather(torch.cat([t, pad]).to(self.device)).cpu()  # (world, max rows, ...)
            gathered[k] = torch.cat([g[r, :int(n)] for r, n in enumerate(counts)])
        return gathered if outs and isinstance(outs[0], dict) else tuple(gathered[k] for k in keys)
