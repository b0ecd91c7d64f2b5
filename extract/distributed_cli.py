"""``torchrun ... -m headprobe.extract.distributed_cli``: ``headprobe extract`` over all torchrun ranks, each
extracting its share into a shard that rank 0 joins (see :mod:`headprobe.extract.distributed`)."""
from __future__ import annotations

import argparse
import os

from headprobe import HeadprobeError
from headprobe.extract.distributed import _barrier, _rendezvous, extract_share, join_shards
from headprobe.extract.extractor import ExtractConfig, check_output


def main(argv: list[str] | None = None) -> None:
    from headprobe.extract.cli import add_arguments
    from headprobe.extract.models import load_model
    from headprobe.extract.tasks import resolve_task

    p = argparse.ArgumentParser(prog="torchrun ... -m headprobe.extract.distributed_cli",
                                description="extract a task over all torchrun ranks and join the shards "
                                            "(shares are whole --block_examples blocks)")
    add_arguments(p)
    p.add_argument("--join-only", action="store_true",
                   help="only join existing shards (one process; pass --world-size of the extraction)")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the extraction, for --join-only")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="process group backend")
    p.add_argument("--timeout-hours", type=float, default=24.0, help="how long ranks wait for each other")
    args = p.parse_args(argv)
    rank, world, local_rank = (0, args.world_size or 1, 0) if args.join_only else _rendezvous(args.backend,
                                                                                              args.timeout_hours)
    device = args.device
    if device == "cuda" and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        device = f"cuda:{local_rank}"  # one GPU per process
    try:
        task = resolve_task(args.task)
        cfg = ExtractConfig(layers=args.layers, positions=args.positions, store_dtype=args.store_dtype,
                            writes=args.writes, padding_side=args.padding_side, batch_tokens=args.batch_tokens,
                            seed=args.seed, max_examples=args.max_examples, block_examples=args.block_examples,
                            truncate=args.truncate)
        check_output(args.out, args.resume, args.overwrite)
        if not args.join_only and not (args.resume and args.out.exists() and not args.overwrite):
            load = lambda: load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map)
            extract_share(load, task, args.out, cfg, rank, world, resume=args.resume, overwrite=args.overwrite,
                          progress=args.progress and rank == 0)
            _barrier(world)
            if rank == 0:
                join_shards(args.out, task, cfg, world, overwrite=True)
        elif args.join_only:
            join_shards(args.out, task, cfg, world, overwrite=args.overwrite)
        if rank == 0:
            from headprobe.extract.store import Store
            with Store(args.out) as store:
                print(f"wrote {args.out}: {store.shape[0]} rows x {store.shape[1]} layers x {store.shape[2]} heads x "
                      f"{store.shape[3]} d_head from {world} shard(s)")
    except HeadprobeError as err:
        raise SystemExit(f"extract.distributed: error (rank {rank}): {err}") from None
    finally:
        if world > 1 and not args.join_only:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
