"""Data from the activation store for Lightning: in memory when it fits, streamed in chunk-aligned blocks otherwise.

Batches are dicts::

    z      (B, L, H, D) float32   per-head outputs of the selected layer slots and heads
    label  (B,)                   class index (int64) or target (float32)
    row    (B,)  int64            row index in the store

Data order is a pure function of (seed, epoch, rank, worker), so a run resumed from an epoch-end checkpoint
replays exactly the batches an uninterrupted run sees. Lightning calls ``set_epoch`` only on samplers, and on
resume it creates the iterator before it sets the epoch; :class:`EpochLoader` therefore reads the epoch from the
trainer's loop each time an epoch's iterator is created, for both the in-memory sampler and the streaming dataset.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, get_worker_info

from headprobe import InputError
from headprobe.extract.store import CHUNK_ROWS, Store, StoreError
from headprobe.train.lightning_api import epoch_to_run


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochBatches(DistributedSampler):
    """Batches of positions into ``range(n)``: shuffled by (seed, epoch), sharded across ranks; one batch of the
    whole split in one process comes in order (the order within a batch changes nothing).

    Training (``shuffle=True``) gives every rank ``n // world`` positions, so ranks take the same number of steps
    (the other ``n % world`` wait for a later epoch's draw), unless ``full_pass``: then, as in evaluation, the
    ranks' shares differ by at most one and cover every row once (for modules that sum statistics over the epoch),
    and a rank whose share needs fewer batches ends with empty ones (Lightning steps all ranks together).
    Evaluation (``shuffle=False``) splits all positions into contiguous shares, so every row is evaluated exactly
    once: reduce metrics as sums over ranks. A ``DistributedSampler`` subclass (rank and world are read when
    iterating, not at construction), so Lightning's ``use_distributed_sampler`` leaves it alone instead of
    sharding it again.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 full_pass: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.full_pass, self.epoch = full_pass, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _positions(self) -> np.ndarray:
        rank, world = _dist()
        one_batch = world == 1 and self.batch_size >= self.n  # order within one batch changes nothing: no gather
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(self.n) if self.shuffle and not one_batch
                 else np.arange(self.n))
        if world == 1:
            return order
        if self.shuffle and not self.full_pass:
            per_rank = self.n // world  # equal shares, so ranks step together
            return order[rank * per_rank:(rank + 1) * per_rank]
        return np.array_split(order, world)[rank]

    def __iter__(self):
        pos = self._positions()
        stop = len(pos) - len(pos) % self.batch_size if self.drop_last else len(pos)
        for i in range(0, stop, self.batch_size):
            yield pos[i:i + self.batch_size]
        for _ in range(len(self) - math.ceil(stop / self.batch_size)):
            yield pos[:0]  # full_pass: empty batches, so that every rank takes as many steps as the fullest

    def __len__(self) -> int:
        if self.full_pass:  # the largest share has ceil(n / world) rows
            return max(1, math.ceil(math.ceil(self.n / _dist()[1]) / self.batch_size))
        n = len(self._positions())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class InMemoryRows(torch.utils.data.Dataset):
    """Rows held in memory (fp16 or fp32 as stored); indexed by a whole batch of positions at once."""

    def __init__(self, z: np.ndarray, labels: np.ndarray, rows: np.ndarray):
        self.z, self.labels, self.rows = torch.from_numpy(z), torch.from_numpy(labels), torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos) -> dict:
        pos = torch.as_tensor(pos)
        if pos.ndim == 1 and len(pos) > 0 and bool((pos.diff() == 1).all()):
            pos = slice(int(pos[0]), int(pos[-1]) + 1)  # a run of rows: sliced, not gathered
        z = self.z[pos]
        # fp16 is converted (a copy); an fp32 slice is a view of the cached split, so it is copied too
        z = z.float() if z.dtype != torch.float32 else (z.clone() if isinstance(pos, slice) else z)
        return {"z": z, "label": self.labels[pos], "row": self.rows[pos]}


class StreamingRows(IterableDataset):
    """Rows streamed from the store: whole chunk-aligned blocks in shuffled order, mixed in a shuffle buffer.

    Blocks are sharded across dataloader workers and distributed ranks; each worker opens its own file handle.
    Training under DDP stops every rank after the batches the emptiest (rank, worker) can fill, so ranks step
    together, unless ``full_pass``: then every row comes once per epoch, and ranks with fewer batches end with
    empty ones.
    """

    def __init__(self, path: str, rows: np.ndarray, batch_size: int, layers=None, heads=None, shuffle: bool = True,
                 seed: int = 0, block_rows: int = 8 * CHUNK_ROWS, buffer_rows: int = 32768, full_pass: bool = False):
        self.path, self.rows, self.batch_size = path, np.sort(rows), batch_size
        self.layers, self.heads, self.shuffle, self.seed = layers, heads, shuffle, seed
        self.block_rows, self.buffer_rows, self.full_pass, self.epoch = block_rows, buffer_rows, full_pass, 0
        block_of = self.rows // block_rows
        self.blocks = [self.rows[block_of == b] for b in np.unique(block_of)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _deal(self) -> tuple[np.ndarray, int, int, int]:
        """This epoch's block order, the number of (rank, worker) slots it is dealt to in turn, this worker's slot,
        and the workers per rank."""
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(len(self.blocks)) if self.shuffle
                 else np.arange(len(self.blocks)))
        rank, world = _dist()
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        return order, world * nworkers, rank * nworkers + wid, nworkers

    def _my_blocks(self) -> list[np.ndarray]:
        order, slots, slot, _ = self._deal()
        return [self.blocks[b] for b in order[slot::slots]]

    def _slot_rows(self) -> list[int]:
        order, slots, _, _ = self._deal()
        return [sum(len(self.blocks[b]) for b in order[s::slots]) for s in range(slots)]

    def _equal_steps(self) -> bool:
        """Whether every (rank, worker) must yield the same number of equal batches (DDP training)."""
        return _dist()[1] > 1 and self.shuffle and not self.full_pass

    def _batch_rows(self) -> int:
        """Rows per batch: ``batch_size``, or under DDP training at most what the emptiest (rank, worker) holds (a
        whole-split batch is then each one's equal share)."""
        if not self._equal_steps():
            return self.batch_size
        fewest = min(self._slot_rows())
        if fewest == 0:
            raise InputError(f"{self.path}: the train split's {len(self.blocks)} streamed blocks cannot feed every "
                             f"process and dataloader worker: use fewer --data.num_workers or processes, a smaller "
                             f"--data.block_chunks, or --data.in_memory true")
        return min(self.batch_size, fewest)

    def _step_cap(self) -> int | None:
        """Training batches per (rank, worker) under DDP: the fewest any of them can fill, so ranks step together."""
        return min(self._slot_rows()) // self._batch_rows() if self._equal_steps() else None

    def _padding(self) -> int:
        """``full_pass``: the empty batches that worker 0 of this rank appends so that every rank takes as many
        batches as the fullest (Lightning steps DDP ranks together); a worker yields ceil(rows / batch) batches."""
        if not (self.full_pass and self.shuffle):
            return 0
        _, _, slot, nworkers = self._deal()
        if slot % nworkers:
            return 0
        rows = self._slot_rows()
        per_rank = [sum(math.ceil(n / self.batch_size) for n in rows[r:r + nworkers])
                    for r in range(0, len(rows), nworkers)]
        return max(max(per_rank), 1) - per_rank[slot // nworkers]

    def __iter__(self):
        return itertools.chain(itertools.islice(self._batches(self._batch_rows()), self._step_cap()),
                               self._empty_batches())

    def _empty_batches(self):
        n = self._padding()
        if n:
            with Store(self.path) as store:
                none = self.rows[:0]
                batch = {"z": torch.from_numpy(store.activations(none, self.layers, self.heads)).float(),
                         "label": torch.from_numpy(store.labels[none]), "row": torch.from_numpy(none)}
            yield from itertools.repeat(batch, n)

    def _batches(self, batch_rows: int):
        rng = np.random.default_rng((self.seed, self.epoch, *(_dist()), get_worker_info().id if get_worker_info() else 0))
        with Store(self.path) as store:
            labels = store.labels
            buf_z, buf_r = [], []

            def drain(final: bool):
                z, r = np.concatenate(buf_z), np.concatenate(buf_r)
                perm = rng.permutation(len(r)) if self.shuffle else np.arange(len(r))
                keep = len(r) if final else len(r) - len(r) % batch_rows
                for i in range(0, keep, batch_rows):
                    p = perm[i:i + batch_rows]
                    yield {"z": torch.from_numpy(z[p]).float(), "label": torch.from_numpy(labels[r[p]]),
                           "row": torch.from_numpy(r[p])}
                buf_z[:], buf_r[:] = ([z[perm[keep:]]], [r[perm[keep:]]]) if keep < len(r) else ([], [])

            for block in self._my_blocks():
                buf_z.append(store.activations(block, self.layers, self.heads, dtype=store.file["z"].dtype))
                buf_r.append(block)
                if sum(len(b) for b in buf_r) >= self.buffer_rows:
                    yield from drain(final=False)
            if buf_r:
                yield from drain(final=True)


class EpochLoader(DataLoader):
    """A DataLoader that sets the epoch of its sampler or dataset (``epoch_of()``) whenever an epoch starts."""

    def __init__(self, *args, epoch_of=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_of = epoch_of

    def __iter__(self):
        if self.epoch_of is not None:
            epoch = self.epoch_of()
            for obj in (self.sampler, self.dataset):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
        return super().__iter__()


# setting -> (smallest value, what it means): the data module refuses a smaller one in one line
LOWER_BOUNDS = {"batch_size": (0, "rows per batch, or 0 for the whole split in one batch"),
                "num_workers": (0, "DataLoader worker processes (0: load in the main process)"),
                "shuffle_buffer": (1, "rows mixed at once when streaming"),
                "block_chunks": (1, "HDF5 chunks per streamed block"),
                "memory_limit_gb": (0, "GB of activations held in memory"),
                "seed": (0, "the data order's seed")}


def check_settings(hparams: dict) -> None:
    """Refuse a data setting below its smallest sensible value, naming the option and what would work."""
    for key, (least, meaning) in LOWER_BOUNDS.items():
        value = hparams[key]
        if value < least:
            raise InputError(f"--data.{key} {value}: pass {least} or more ({meaning})")


def open_store(path: str) -> Store:
    """The store at ``--data.path``; a missing or unreadable file is refused in one line naming the option."""
    if Path(path).is_dir():
        raise InputError(f"--data.path {path} is a folder: pass the .h5 store file that `headprobe extract` wrote")
    if not Path(path).exists() and not Path(f"{path}.partial").exists():
        raise InputError(f"--data.path {path} does not exist: pass a store written by `headprobe extract`")
    try:
        return Store(path)
    except StoreError as err:
        raise type(err)(f"--data.path: {err}") from None


class StoreDataModule(L.LightningDataModule):
    """Train/val/test splits of one activation store (splits come from the task's leakage groups).

    Args:
        path: the HDF5 store written by ``headprobe extract``.
        layers: storage slots of the layers to use (default: all stored layers).
        heads: heads to use (default: all).
        batch_size: rows per batch; 0 means the whole split in one batch (full-batch optimisers).
        in_memory: keep activations in memory; ``None`` decides from ``memory_limit_gb``.
        num_workers: DataLoader workers (streaming mode shards blocks across them).
        shuffle_buffer: rows mixed at once when streaming.
        block_chunks: HDF5 chunks per streamed block (blocks are read whole, in shuffled order).
        seed: data order seed (the order is a function of seed and epoch).
    """

    def __init__(self, path: str, layers: list[int] | None = None, heads: list[int] | None = None,
                 batch_size: int = 0, in_memory: bool | None = None, memory_limit_gb: float = 4.0,
                 num_workers: int = 0, shuffle_buffer: int = 32768, block_chunks: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.path, self.layers, self.heads, self.batch_size = path, layers, heads, batch_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        with open_store(path) as store:
            self.meta = store.meta
            self.split_rows = {s: store.rows(s) for s in ("train", "val", "test")}
            if not len(self.split_rows["train"]):
                raise InputError(f"{path}: the train split holds no rows ({len(store)} rows in all; splits go "
                                 f"60/20/20 by group): extract more examples")
            L_, H, D = store.shape[1:]
            for name, picked, n in (("layers", layers, L_), ("heads", heads, H)):
                if picked is not None and (not picked or not all(0 <= int(i) < n for i in picked)):
                    what = f"slots of the stored layers {store.meta.layers}" if name == "layers" else "heads"
                    raise InputError(f"--data.{name} {list(picked)}: pick from 0..{n - 1} ({what}) in {path}")
            self.block_rows = block_chunks * (store.file["z"].chunks or (CHUNK_ROWS,))[0]
            nbytes = (len(store) * (len(layers) if layers else L_) * (len(heads) if heads else H) * D
                      * store.file["z"].dtype.itemsize)
        self.in_memory = nbytes <= memory_limit_gb * 2**30 if in_memory is None else in_memory
        self._cache: dict[str, InMemoryRows] = {}

    def state_dict(self) -> dict:
        """Saved in every checkpoint: what decided the store's rows, so that a resume can tell a rebuilt store."""
        return {"store": self.meta.identity()}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: ``train.fit.check_resume`` compares the store before the run starts."""

    @property
    def n_layers(self) -> int:
        return len(self.layers) if self.layers is not None else len(self.meta.layers)

    @property
    def model_layers(self) -> list[int]:
        """Model layer numbers of the selected storage slots."""
        return [self.meta.layers[i] for i in (self.layers if self.layers is not None else range(len(self.meta.layers)))]

    @property
    def n_heads(self) -> int:
        return len(self.heads) if self.heads is not None else self.meta.n_heads

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row arrays of the whole store: label, split, group, token_id, example_id, position."""
        with Store(self.path) as store:
            return {name: store.column(name) for name in ("label", "split", "group", "token_id", "example_id",
                                                          "position")}

    def feature_stats(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (L, H, D) of a split's activations, streamed in chunk-aligned blocks (float64 sums)."""
        rows = self.split_rows[split]
        total = sq = None
        with Store(self.path) as store:
            for i in range(0, len(rows), 16 * CHUNK_ROWS):
                z = store.activations(rows[i:i + 16 * CHUNK_ROWS], self.layers, self.heads).astype(np.float64)
                total = z.sum(0) if total is None else total + z.sum(0)
                sq = (z * z).sum(0) if sq is None else sq + (z * z).sum(0)
        mean = total / max(len(rows), 1)
        return mean, np.sqrt(np.maximum(sq / max(len(rows), 1) - mean * mean, 0))

    def _epoch(self) -> int:
        """The epoch about to run (the trainer's count of processed epochs; 0 outside a trainer)."""
        return epoch_to_run(self.trainer)

    def split(self, name: str) -> InMemoryRows:
        """One split held in memory (read once, chunk-aligned)."""
        if name not in self._cache:
            rows = self.split_rows[name]
            with Store(self.path) as store:
                z = store.activations(rows, self.layers, self.heads, dtype=store.file["z"].dtype)
                self._cache[name] = InMemoryRows(z, store.labels[rows], rows)
        return self._cache[name]

    def _full_pass(self) -> bool:
        """Whether the module being trained needs every training row in every epoch (``full_pass_epochs``)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, "full_pass_epochs", False))

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        rows = self.split_rows[name]
        bs = self.batch_size or max(len(rows), 1)
        epoch_of = self._epoch if shuffle else None
        full = shuffle and self._full_pass()
        if self.in_memory:
            sampler = EpochBatches(len(rows), bs, shuffle, self.seed, full_pass=full)
            return EpochLoader(self.split(name), sampler=sampler, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0, epoch_of=epoch_of)
        ds = StreamingRows(self.path, rows, bs, self.layers, self.heads, shuffle, self.seed,
                           block_rows=self.block_rows, buffer_rows=self.shuffle_buffer, full_pass=full)
        return EpochLoader(ds, batch_size=None, num_workers=self.num_workers, epoch_of=epoch_of)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
