"""Build the checkpoints shipped in checkpoints/: every built-in labelled task is extracted on the default model
and gets a linear and a sparse probe; the tasks of ``STEERED`` also get an intervention built from their shipped
linear probe (``headprobe steer``); the corpus task's layer-15 outputs get a TopK SAE (saved in fp16). Each
checkpoint is re-saved into ``checkpoints/<release>/<name>/`` with the exact commands that reproduce it, and
recorded with its sha256s and metrics in ``checkpoints/registry.json``.

    python checkpoints/build.py              # everything
    python checkpoints/build.py --only capitals-linear,corpus-l15-topk --work /tmp/headprobe-build --hub /tmp/hub

The recorded commands run in the work folder (stores in ``data/``, runs in ``runs/``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RELEASE = "v1"
SAE_LAYER, SAE_EXAMPLES, SAE_TOKENS = 15, 500, 300_000
STEERED = {"sentiment": 2.0}  # tasks whose linear probes ship an intervention (headprobe steer), at this alpha


@dataclass
class Job:
    name: str  # checkpoint name inside the release
    extract: list[str]  # `headprobe extract` arguments
    train: list[str]  # the arguments of the command that makes the checkpoint: `headprobe train` or `steer`
    dtype: torch.dtype | None = None  # cast floating tensors when shipping


def jobs() -> list[Job]:
    from headprobe.extract.tasks import TASKS

    out = []
    for task in (t for t in TASKS.values() if t.label_kind != "none"):
        extract = ["extract", "--task", task.name, "--out", f"data/{task.name}.h5", "--no-progress"]
        for kind in ("linear", "sparse"):
            name = f"{task.name}-{kind}"
            out.append(Job(name, extract, ["train", kind, "--data.path", f"data/{task.name}.h5", "--out",
                                           f"runs/{name}", "--logger", "none"]))
        if task.name in STEERED:  # the sweep's table and plot land in runs/<name>, the intervention in its checkpoint
            name = f"{task.name}-steer"
            out.append(Job(name, extract, ["steer", "--probe", f"{RELEASE}/{task.name}-linear", "--store",
                                           f"data/{task.name}.h5", "--out", f"runs/{name}", "--save",
                                           f"runs/{name}/checkpoint", "--alpha", str(STEERED[task.name])]))
    store = f"data/corpus-l{SAE_LAYER}.h5"
    out.append(Job(f"corpus-l{SAE_LAYER}-topk",
                   ["extract", "--task", "corpus", "--layers", str(SAE_LAYER), "--max-examples", str(SAE_EXAMPLES),
                    "--out", store, "--no-progress"],
                   ["train", "sae", "--data.path", store, "--out", f"runs/corpus-l{SAE_LAYER}-topk", "--logger", "none",
                    "--model.init_args.token_budget", str(SAE_TOKENS)], dtype=torch.float16))
    return out


def command(job: Job) -> str:
    return " && ".join(shlex.join(["headprobe", *args]) for args in (job.extract, job.train))


def build(job: Job, hub: Path, release: str) -> Path:
    """Run the job's commands in the current folder and ship its checkpoint into ``hub/release/name``."""
    from headprobe.probes.checkpoint import read_checkpoint, save_checkpoint
    from headprobe.probes.hub import push_to_folder
    from headprobe.train.cli import main

    store = Path(job.extract[job.extract.index("--out") + 1])
    if not store.exists():
        main(job.extract)
    run = Path(job.train[job.train.index("--out") + 1])
    shutil.rmtree(run, ignore_errors=True)  # a rebuild trains afresh, as the recorded command does
    main(job.train)
    config, tensors, metrics = read_checkpoint(run / "checkpoint")
    ref = f"{release}/{job.name}"
    folder = save_checkpoint(hub / ref, tensors, replace(config, command=command(job)), metrics, dtype=job.dtype)
    push_to_folder(folder, hub, ref, revision=release, overwrite=True)  # a rebuild replaces the release's entry
    print(f"shipped {ref}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.2f} MB")
    return folder


KEY_METRICS = ("val/acc_mean", "val/acc_max", "val/acc", "val/heads_selected", "test/fve", "test/l0", "test/dead_frac",
               "alpha", "effect/margin", "side/kl")


def write_readme(hub: Path) -> Path:
    """checkpoints/README.md: one row per registry entry, with its key metrics and reproducing command."""
    from headprobe.probes.hub import Registry

    registry = Registry.open(hub)
    lines = ["# Shipped checkpoints", "",
             "Trained on the default model (SmolLM2-135M-Instruct, `smollm2-135m`) by `python checkpoints/build.py`;",
             "load one with `headprobe.load(\"<id>\")` (offline; every file is checked against `registry.json`).",
             "Each checkpoint's `config.json` and `README.md` hold the exact commands that reproduce it (run them in",
             "an empty folder). The format and the hub are described in docs/checkpoints.md.", "",
             "| id | class | task (stage) | size | metrics |", "|---|---|---|---|---|"]
    for ref, e in registry.entries.items():
        shown = ", ".join(f"{k} {e.metrics[k]:.3g}" for k in KEY_METRICS if k in e.metrics)
        lines.append(f"| `{ref}` | {e.cls} | {e.task} ({e.stage or '-'}) | {e.size_bytes / 1e6:.2f} MB | {shown} |")
    lines += ["", "Commands:", ""]
    lines += [f"- `{ref}`: `{e.command}`" for ref, e in registry.entries.items()]
    (hub / "README.md").write_text("\n".join(lines) + "\n")
    return hub / "README.md"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated checkpoint names (default: all)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "headprobe-build",
                   help="folder for stores and runs")
    p.add_argument("--hub", type=Path, default=HERE, help="hub folder to ship into (default: checkpoints/)")
    p.add_argument("--release", default=RELEASE)
    args = p.parse_args()
    todo = [j for j in jobs() if not args.only or j.name in args.only.split(",")]
    hub = args.hub.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chdir(args.work)
    for job in todo:
        build(job, hub, args.release)
    write_readme(hub)


if __name__ == "__main__":
    main()
