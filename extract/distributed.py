"""Extraction across processes and nodes: every rank extracts a contiguous share of a task's examples into its own
shard store, and rank 0 joins the shards into one master store made of HDF5 virtual datasets.

    torchrun --nproc_per_node 2 -m headprobe.extract.distributed_cli --task capitals --out capitals.h5

Shares are runs of whole ``block_examples`` blocks (so batches, and hence activations, are the ones a one-process
run computes), balanced over the ranks. Each rank writes ``<out stem>.shard-RRRRR-of-WWWWW<suffix>`` through
:func:`extract.extractor.extract`, so ``--resume`` continues every rank where it stopped. The master file
``<out>`` holds virtual datasets that point at the shards (relative paths: keep the files in one folder) and
reads, through :class:`extract.store.Store`, exactly as a one-process extraction: same rows in the same order,
the same example ids, leakage groups, splits and metadata. Rows are per-row data of the shards except
``example_id``, ``group`` and ``split``, which depend on all examples and are stored in the master itself.

The ranks synchronise once (a barrier before the join), so the process group is gloo on every device. On several
nodes the shards must land on a shared filesystem; otherwise copy them into one folder and run the same command
with ``--join-only`` in one process.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np

from headprobe.extract.extractor import ExtractConfig, ExtractError, extract
from headprobe.extract.store import StoreError, StoreMeta
from headprobe.extract.tasks import Task, assign_splits, dataset_hash
from headprobe.extract.tasks.user import require_every_split

PER_EXAMPLE = ("example_id", "group", "split")  # columns that depend on every example: stored in the master


def shares(n_examples: int, world: int, block: int) -> list[tuple[int, int]]:
    """Contiguous example ranges [lo, hi) per rank: whole blocks of ``block`` examples, balanced over ranks.

    With fewer blocks than ranks the block shrinks to ``ceil(n / world)`` so every rank gets work.
    """
    if world < 1 or block < 1:
        raise ValueError("world size and block size must be positive")
    if -(-n_examples // block) < world:
        block = max(1, -(-n_examples // world))
    n_blocks = -(-n_examples // block)
    cuts = [min(n_examples, block * (n_blocks * r // world)) for r in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{rank:05d}-of-{world:05d}{out.suffix}")


def _task_examples(task: Task, cfg: ExtractConfig) -> list:
    """The examples of the whole extraction; user data too small for every split is refused here, as the shares
    are split again in the join (a share's own splits say nothing)."""
    examples = task.examples(cfg.seed)[: cfg.max_examples]
    if not examples:
        raise ExtractError(f"task {task.name!r} has no examples: check the data file")
    keys = [ex.group or str(i) for i, ex in enumerate(examples)]
    require_every_split(task, keys, assign_splits(keys, task.split_fractions, cfg.seed))
    return examples


def extract_share(load, task: Task, out: str | Path, cfg: ExtractConfig, rank: int, world: int, *,
                  resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path | None:
    """Extract rank ``rank``'s share of ``task`` into its shard file; None when the share is empty.

    ``load`` is a LoadedModel or a zero-argument callable returning one (called only if there is work to do).
    """
    examples = _task_examples(task, cfg)
    lo, hi = shares(len(examples), world, cfg.block_examples)[rank]
    if lo == hi:
        return None
    path = shard_path(out, rank, world)
    if resume and path.exists() and not overwrite:
        return path
    share = examples[lo:hi]
    sub = replace(task, make=lambda seed: share, extra={**task.extra, "share": (lo, hi)})
    loaded = load() if callable(load) else load
    return extract(loaded, sub, path, replace(cfg, max_examples=None), resume=resume, overwrite=overwrite,
                   progress=progress)


def _virtual(f: h5py.File, name: str, sources: list[tuple[str, h5py.Dataset]]) -> None:
    """A virtual dataset ``name`` stacking the same-named datasets of the shards along rows."""
    first = sources[0][1]
    n = sum(ds.shape[0] for _, ds in sources)
    layout = h5py.VirtualLayout((n, *first.shape[1:]), first.dtype)
    row = 0
    for filename, ds in sources:
        layout[row:row + ds.shape[0]] = h5py.VirtualSource(filename, name, ds.shape, ds.dtype)
        row += ds.shape[0]
    fill = np.nan if np.issubdtype(first.dtype, np.floating) else -1  # a missing shard reads as nan / -1
    f.create_virtual_dataset(name, layout, fillvalue=fill)


def join_shards(out: str | Path, task: Task, cfg: ExtractConfig, world: int, overwrite: bool = False) -> Path:
    """Write the master store ``out`` over the shards of a ``world``-rank extraction; returns ``out``."""
    out = Path(out)
    examples = _task_examples(task, cfg)
    ranges = shares(len(examples), world, cfg.block_examples)
    paths = [(shard_path(out, r, world), lo) for r, (lo, hi) in enumerate(ranges) if hi > lo]
    missing = [str(p) for p, _ in paths if not p.exists()]
    if missing:
        hint = " (interrupted: relaunch with --resume)" if any(Path(m + ".partial").exists() for m in missing) else ""
        raise StoreError(f"shards missing for the join: {', '.join(missing)}{hint}; relaunch all {world} ranks")
    if out.exists() and not overwrite:
        raise ExtractError(f"{out} exists: pass --overwrite to replace it, or choose another --out")

    keys = [ex.group or str(i) for i, ex in enumerate(examples)]  # as a one-process extraction: no group, own group
    groups = {g: i for i, g in enumerate(sorted(set(keys)))}
    splits = assign_splits(keys, task.split_fractions, cfg.seed)
    group_of = np.array([groups[k] for k in keys], dtype=np.int64)
    files = [h5py.File(p, "r") for p, _ in paths]
    try:
        metas = [StoreMeta.from_attrs(f.attrs) for f in files]
        incomplete = [str(p) for (p, _), f in zip(paths, files) if not bool(f.attrs.get("complete", False))]
        if incomplete:
            raise StoreError(f"shards {', '.join(incomplete)} are incomplete: relaunch with --resume")
        shared = lambda m: {**m.__dict__, "n_examples": 0, "n_rows": 0, "dataset_hash": "", "created": "",
                            "config": {**m.config, "n_examples": 0}}
        if any(shared(m) != shared(metas[0]) for m in metas[1:]):
            raise StoreError(f"the shards of {out} were written with different models or settings: "
                             f"relaunch every rank with --overwrite")
        example_id = np.concatenate([f["example_id"][:] + lo for f, (_, lo) in zip(files, paths)])
        meta = replace(metas[0], n_examples=len(examples), n_rows=len(example_id),
                       dataset_hash=dataset_hash(examples), config={**metas[0].config, "n_examples": len(examples)},
                       created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        tmp = out.with_name(out.name + ".join-tmp")
        with h5py.File(tmp, "w", track_order=True) as master:
            for name, ds in files[0].items():
                if name in PER_EXAMPLE:
                    continue
                if ds.shape and ds.shape[0] == metas[0].n_rows:
                    _virtual(master, name, [(p.name, f[name]) for (p, _), f in zip(paths, files)])
                else:  # per-store arrays such as out_bias
                    master.create_dataset(name, data=ds[()])
            master.create_dataset("example_id", data=example_id)
            master.create_dataset("group", data=group_of[example_id])
            master.create_dataset("split", data=splits[example_id])
            master.attrs.update(meta.to_attrs())
            master.attrs["shards"] = json.dumps([{"file": p.name, "first_example": lo, "rows": m.n_rows}
                                                 for (p, lo), m in zip(paths, metas)])
            master.attrs["complete"] = True
    finally:
        for f in files:
            f.close()
    os.replace(tmp, out)
    return out


def _rendezvous(backend: str, timeout_h: float) -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun's environment; initialises the process group if world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        import torch
        import torch.distributed as dist
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # nccl's barrier runs on this process's GPU
        dist.init_process_group(backend, timeout=timedelta(hours=timeout_h))
    return rank, world, local_rank


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
