"""Synthetic batches for the toy models, generated on the fly and seeded by the training step.

The batch of step s comes from ``numpy.random.default_rng((seed, s))`` alone, so a resumed run sees exactly the
batches an uninterrupted one would have. One Lightning epoch is ``eval_every`` steps: the curves' checkpoints fall
on epoch ends, where ``checkpoints/last.ckpt`` is written, and each epoch's loader starts at the trainer's step.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from headprobe import InputError
from headprobe.train.toy.tasks import TASKS, ToyBatch


def _as_is(batch):
    return batch


class StepBatches(IterableDataset):
    """The batches of steps ``first .. first + count - 1`` of a toy task (one epoch)."""

    def __init__(self, data: "ToyData", first: int, count: int):
        self.data, self.first, self.count = data, first, count

    def __len__(self) -> int:  # Lightning counts the run's steps from it (the learning-rate schedule needs them)
        return self.count

    def __iter__(self):
        d = self.data
        for step in range(self.first, self.first + self.count):
            yield d.task.make(np.random.default_rng((d.seed, step)), d.batch_size, d.seq_len, d.n_min, d.n_max)


class ToyData(L.LightningDataModule):
    """Training batches and the fixed evaluation batch of a toy task.

    Args:
        task: induction, previous_token or successor
        batch_size: sequences per step
        seq_len: tokens per training sequence (BOS included)
        n_min: induction: shortest repeated block
        n_max: induction: longest repeated block (at most 64 distinct symbols)
        seed: data seed (batches and the evaluation batch)
        eval_every: steps between checkpoints (curves' points, last.ckpt)
    """

    def __init__(self, task: str = "induction", batch_size: int = 32, seq_len: int = 104, n_min: int = 8,
                 n_max: int = 50, seed: int = 0, eval_every: int = 50):
        super().__init__()
        if task not in TASKS:
            raise InputError(f"--data.task {task!r}: choose one of {', '.join(TASKS)}")
        if batch_size < 1 or eval_every < 1 or seq_len < 8:
            raise InputError(f"--data.batch_size {batch_size}, --data.eval_every {eval_every}, --data.seq_len "
                             f"{seq_len}: pass positive sizes and a seq_len of 8 or more")
        if not 2 <= n_min <= n_max <= 64 or (task == "induction" and n_max >= seq_len - 1):
            raise InputError(f"--data.n_min {n_min}, --data.n_max {n_max}: pass 2 <= n_min <= n_max <= 64, with "
                             f"n_max below seq_len - 1 ({seq_len - 1}) so that every block repeats")
        self.save_hyperparameters()
        self.task, self.batch_size, self.seq_len = TASKS[task], batch_size, seq_len
        self.n_min, self.n_max, self.seed, self.eval_every = n_min, n_max, seed, eval_every

    def train_dataloader(self) -> DataLoader:
        first = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(StepBatches(self, first, self.eval_every), batch_size=None, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.eval_batch()], batch_size=None, collate_fn=_as_is)

    def eval_batch(self, device: torch.device | str = "cpu") -> ToyBatch:
        """The task's fixed evaluation batch (seeded by ``seed``), on ``device``."""
        return self.transfer_batch_to_device(self.task.evaluate(self.seed), torch.device(device), 0)

    def transfer_batch_to_device(self, batch: ToyBatch, device: torch.device, dataloader_idx: int) -> ToyBatch:
        return ToyBatch(batch.ids.to(device), batch.targets.to(device),
                        {k: v.to(device) for k, v in batch.masks.items()})
