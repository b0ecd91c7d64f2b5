"""Benchmark: extraction and SAE training with 1 vs N processes on this machine (CPU, gloo), in one run.

    python bench/bench_scale.py                       # smollm2-135m, corpus task: 1x2, 1x1, 2x1
    python bench/bench_scale.py --configs 1x4 2x2 4x1 --examples 320 --sae-steps 40

A configuration PxT is P processes with T threads each (``OMP_NUM_THREADS``), launched with ``torchrun --standalone
--nproc_per_node P`` running this file as a worker. Timed regions exclude process start and model loading:

* extraction: ``extract.distributed`` (each rank extracts its share into a shard, rank 0 joins the master
  store), from a barrier after loading to the finished master; tokens/s = stored rows (one per token) / wall.
* SAE: a TopK SAE (d_sae 8 x d_in, k 32) on the extracted layer under Lightning (DDP when N > 1), per-rank batch
  ``--batch``; tokens/s = tokens of all ranks over the steps after ``--warmup`` steps / their wall time.

Every configuration runs ``--repeats`` times, alternating, and its best run is reported. The machine is shared
with other jobs: compare the numbers of one run with each other, not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _world() -> tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def worker_extract(args) -> dict:
    from headprobe.extract.distributed import extract_share, join_shards
    from headprobe.extract.extractor import ExtractConfig
    from headprobe.extract.models import load_model
    from headprobe.extract.store import Store
    from headprobe.extract.tasks import get_task

    rank, world = _world()
    loaded = load_model(args.model)
    task = get_task(args.task)
    cfg = ExtractConfig(layers=[args.layer], max_examples=args.examples, block_examples=args.block)
    _barrier(world)
    t0 = time.perf_counter()
    extract_share(loaded, task, args.out, cfg, rank, world, overwrite=True, progress=False)
    _barrier(world)
    if rank == 0:
        join_shards(args.out, task, cfg, world, overwrite=True)
    wall = time.perf_counter() - t0
    with Store(args.out) as s:
        rows = len(s)
    return {"rank": rank, "world": world, "wall_s": wall, "tokens": rows, "tok_per_s": rows / wall}


def worker_sae(args) -> dict:
    import lightning as L

    from headprobe.probes.sae import SparseAutoencoder
    from headprobe.train.data import StoreDataModule

    rank, world = _world()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.wall = time.perf_counter() - self.t0

    clock = Clock()
    dm = StoreDataModule(args.out, batch_size=args.batch, in_memory=True)
    sae = SparseAutoencoder(architecture="topk", expansion=8, k=32, b_dec_init="mean", init_rows=4096)
    trainer = L.Trainer(max_steps=args.sae_steps, accelerator="cpu", devices=world, precision=args.precision,
                        strategy="ddp" if world > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[clock])
    trainer.fit(sae, dm)
    tokens = (args.sae_steps - args.warmup) * args.batch * world
    return {"rank": rank, "world": world, "wall_s": clock.wall, "tokens": tokens, "tok_per_s": tokens / clock.wall,
            "d_in": sae.d_in, "d_sae": sae.d_sae}


def launch(what: str, nproc: int, threads: int, args) -> dict:
    result = Path(tempfile.mkdtemp()) / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--worker", what, "--result", str(result), "--model", args.model,
           "--task", args.task, "--layer", str(args.layer), "--examples", str(args.examples), "--block",
           str(args.block), "--out", args.out, "--batch", str(args.batch), "--sae-steps", str(args.sae_steps),
           "--warmup", str(args.warmup), "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} with {nproc} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["1x2", "1x1", "2x1"],
                   help="PROCESSESxTHREADS per configuration; ratios are against the first")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="corpus", help="an all-token task: one row per token")
    p.add_argument("--layer", type=int, default=15, help="layer extracted (the forward stops after it)")
    p.add_argument("--examples", type=int, default=160)
    p.add_argument("--block", type=int, default=16, help="examples per block (shares are whole blocks)")
    p.add_argument("--batch", type=int, default=1024, help="SAE tokens per step per process")
    p.add_argument("--sae-steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="32-true", help="Lightning precision of SAE training (e.g. bf16-mixed)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (alternating); best is kept")
    p.add_argument("--out", default=None, help="store written by the extraction (default: a temporary file)")
    p.add_argument("--worker", choices=["extract", "sae"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
        out = worker_extract(args) if args.worker == "extract" else worker_sae(args)
        if out["rank"] == 0:
            Path(args.result).write_text(json.dumps(out))
        return
    args.out = args.out or str(Path(tempfile.mkdtemp()) / "bench_scale.h5")
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    print(f"{args.model}, task {args.task} ({args.examples} examples, layer {args.layer}); {os.cpu_count()} cores; "
          f"SAE batch {args.batch}/process, {args.sae_steps} steps ({args.warmup} warmup), {args.precision}")
    rows = []
    for what in ("extract", "sae"):
        best = {}
        for _ in range(args.repeats):  # alternate the configurations; keep each one's best run
            for c in configs:
                r = launch(what, *c, args)
                if c not in best or r["tok_per_s"] > best[c]["tok_per_s"]:
                    best[c] = r
        base = best[configs[0]]["tok_per_s"]
        rows += [(what, *c, best[c]["tokens"], best[c]["wall_s"], best[c]["tok_per_s"], best[c]["tok_per_s"] / base)
                 for c in configs]
    print(f"{'stage':8} {'procs':>5} {'thr/proc':>8} {'tokens':>8} {'wall s':>7} {'tok/s':>9} {'vs 1':>5}")
    for what, n, thr, tok, wall, rate, ratio in rows:
        print(f"{what:8} {n:5d} {thr:8d} {tok:8d} {wall:7.1f} {rate:9,.0f} {ratio:5.2f}")
    from headprobe.extract.distributed import shard_path

    for n in {c[0] for c in configs}:
        for r in range(n):
            shard_path(args.out, r, n).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
