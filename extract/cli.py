"""``headprobe extract``: run a model over a task and write the activation store."""
from __future__ import annotations

import argparse
from pathlib import Path

from headprobe.extract.extractor import ExtractConfig, check_output, extract, preflight
from headprobe.extract.models import DEFAULT_MODEL, check_device, check_dtype, open_model
from headprobe.extract.store import Store
from headprobe.extract.tasks import resolve_task
from headprobe.train.options import add_flag, boolean


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, hub id, local folder or .gguf file")
    p.add_argument("--task", required=True, help="built-in task name (see `headprobe tasks`), a .jsonl/.csv file, "
                                                 "or hf:NAME?text=COL&label=COL (needs `pip install datasets`)")
    p.add_argument("--out", required=True, type=Path, help="output HDF5 file")
    p.add_argument("--layers", type=_layer_list, default=None, help="comma-separated layers (default: all)")
    p.add_argument("--positions", choices=["last", "all", "task"], default=None,
                   help="which tokens to store (default: the task's rule)")
    p.add_argument("--store_dtype", "--store-dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device_map", "--device-map", default=None,
                   help='"auto": spread a model too big for one GPU over all visible GPUs (overrides --device)')
    add_flag(p, "--writes", "also store each head's residual-stream write")
    p.add_argument("--padding_side", "--padding-side", choices=["right", "left"], default="right")
    p.add_argument("--batch_tokens", "--batch-tokens", type=int, default=4096, help="padded tokens per forward batch")
    p.add_argument("--block_examples", "--block-examples", type=int, default=256,
                   help="examples per committed block (what a --resume may have to redo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_examples", "--max-examples", type=int, default=None)
    add_flag(p, "--truncate",
                   "cut inputs longer than the model's context to their last tokens (a prepended BOS stays) "
                        "instead of refusing them; a --positions task index in the cut part is still refused")
    add_flag(p, "--resume", "continue an interrupted extraction")
    add_flag(p, "--overwrite", "replace an existing output")
    p.add_argument("--progress", nargs="?", const=True, default=True, type=boolean,
                   help="progress bars (default true; --progress false or --no_progress hides them)")
    p.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: layer numbers separated by commas, such as 3,4,5") from None


def run(args: argparse.Namespace) -> None:
    """Check what can be checked before the model's weights load (the output path, the settings, the data against
    the model's config and tokenizer, the free space), then load them and extract."""
    check_output(args.out, args.resume, args.overwrite)
    cfg = ExtractConfig(layers=args.layers, positions=args.positions, store_dtype=args.store_dtype,
                        writes=args.writes, padding_side=args.padding_side, batch_tokens=args.batch_tokens,
                        block_examples=args.block_examples, seed=args.seed, max_examples=args.max_examples,
                        truncate=args.truncate)
    check_dtype(args.dtype)
    if args.device_map is None:
        check_device(args.device)
    task = resolve_task(args.task)
    source = open_model(args.model)
    plan = preflight(source.config, source.tokenizer, task, args.out, cfg, resume=args.resume and not args.overwrite)
    loaded = source.load(dtype=args.dtype, device=args.device, device_map=args.device_map)
    path = extract(loaded, task, args.out, cfg, resume=args.resume, overwrite=args.overwrite,
                   progress=args.progress, plan=plan)
    with Store(path) as store:
        print(f"wrote {path}: {store.shape[0]} rows x {store.shape[1]} layers x {store.shape[2]} heads x "
              f"{store.shape[3]} d_head ({store.meta.dtype})")
