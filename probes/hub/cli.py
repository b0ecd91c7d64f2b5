"""``headprobe hub``: list, show and publish checkpoints.

    headprobe hub list [--hub DIR|URL]
    headprobe hub show REF [--hub DIR|URL]
    headprobe hub push PATH --to hf:ORG/NAME[/SUBFOLDER] | --to DIR --id RELEASE/NAME

Downloads from a static hub are capped by $HEADPROBE_MAX_DOWNLOAD_MB (default 2048) and $HEADPROBE_HUB_TIMEOUT
seconds per file (default 1800). Text from a checkpoint or registry is printed with control characters escaped,
so a hostile hub cannot drive the terminal.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from headprobe.probes.checkpoint import read_checkpoint, scalar_metrics
from headprobe.probes.hub.registry import CONTROL_RE, Registry, push_to_folder, push_to_hf, resolve
from headprobe.train.options import add_flag

HUB_HELP = "a hub folder with registry.json, or an http(s) base URL (default: the checkpoints shipped with headprobe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="the checkpoints in a registry")
    ls.add_argument("--hub", default=None, help=HUB_HELP)
    show = sub.add_parser("show", help="config and metrics of one checkpoint (folder, id, hf:repo or URL)")
    show.add_argument("ref")
    show.add_argument("--hub", default=None, help=HUB_HELP)
    push = sub.add_parser("push", help="publish a checkpoint folder")
    push.add_argument("path", help="checkpoint folder")
    push.add_argument("--to", required=True, help="hf:ORG/NAME[/SUBFOLDER] (Hugging Face Hub) or a hub folder")
    push.add_argument("--id", default=None, help="RELEASE/NAME in a hub folder (default: local/<folder name>, or "
                      "local/<run folder name> for a run's checkpoint/ folder)")
    add_flag(push, "--overwrite", "replace an id the hub folder already holds")
    push.add_argument("--revision", default="", help="release label recorded in the registry")
    push.add_argument("--command", default="", help="the command that reproduces the checkpoint")
    add_flag(push, "--private", "create the Hugging Face repo as private")


def _printable(text: str) -> str:
    """``text`` with control characters (terminal escapes) written as ``\\x1b``-style escapes."""
    return CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def _fmt(metrics: dict, n: int = 3) -> str:
    return ", ".join(f"{_printable(k)}={v:.3g}" for k, v in list(metrics.items())[:n]) or "-"


def run(args: argparse.Namespace) -> None:
    if args.action == "list":
        registry = Registry.open(args.hub)
        print(f"{len(registry.entries)} checkpoints in {registry.base}")
        rows = [(k, e.cls, e.task, e.stage, e.model_id, f"{e.size_bytes / 1e6:.2f} MB", _fmt(e.metrics))
                for k, e in registry.entries.items()]
        if rows:
            head = ("id", "class", "task", "stage", "model", "size", "metrics")
            widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
            for row in [head, *rows]:
                print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    elif args.action == "show":
        folder, _ = resolve(args.ref, args.hub)
        config, tensors, metrics = read_checkpoint(folder)
        print(_printable(f"{args.ref}: {folder}"))
        print(json.dumps({k: v for k, v in vars(config).items()}, indent=2))
        print(_printable("tensors: " + ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                                                 for k, v in tensors.items())))
        print("metrics: " + _fmt(scalar_metrics(metrics), n=20))
    elif args.action == "push":
        if args.to.startswith("hf:"):
            print(f"pushed {args.path} to {push_to_hf(args.path, args.to[3:], private=args.private)}")
        else:
            path = Path(args.path).resolve()
            ref = args.id or f"local/{path.parent.name if path.name == 'checkpoint' else path.name}"
            dest = push_to_folder(args.path, args.to, ref, revision=args.revision, command=args.command,
                                  overwrite=args.overwrite)
            print(f"published {ref} at {dest}; registry {Path(args.to) / 'registry.json'} updated")
