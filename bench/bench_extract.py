"""Extraction speed and memory on the default model, measured in one run (a benchmark, not a test).

    python bench/bench_extract.py            # ~3 min on 2 idle cores

Prints, for the same length-sorted, padded batches of the ``capitals`` task:
  extract   headprobe's extraction of every head's z (all 30 layers) into an HDF5 store, end to end
  (a) plain  ``model(**batch)``: the full causal LM forward, logits included
  (b) floor  ``model.base_model(**batch)``: the bare forward through the hooked layers, no hooks, no writes
and the throughput ratios extract/(a) (goal >= 1.2) and extract/(b) (goal >= 0.9). Each mode runs ``--rounds``
times, interleaved, and the fastest round counts (other processes only ever slow a round down).
Then peak RSS (ru_maxrss) of an extraction of N and of 10N examples, each in a fresh subprocess (goal: < 10%
growth), the time of a model load from the safetensors cache, and scattered-row read speed of the store.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headprobe.extract import ExtractConfig, extract, load_model
from headprobe.extract.extractor import Tokens, _batches, _pad
from headprobe.extract.tasks import Example, Task, get_task


def many_statements(n: int) -> Task:
    """``n`` distinct short statements (the capitals task's, numbered) for the memory runs."""
    base = get_task("capitals").examples(0)

    def make(seed: int) -> list[Example]:
        return [Example(text=f"{base[i % len(base)].text} ({i})", label=base[i % len(base)].label, group=str(i))
                for i in range(n)]
    return Task(f"statements-{n}", "KR", "numbered capital statements", ["false", "true"], make)


def forward_batches(loaded, task: Task, cfg: ExtractConfig) -> list[dict[str, torch.Tensor]]:
    """The padded batches the extractor forms (same length sorting, token budget and padding)."""
    examples = task.examples(cfg.seed)
    tokens = Tokens(loaded.tokenizer, examples)
    pad_id = loaded.tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(examples), cfg.block_examples):
        stop = min(start + cfg.block_examples, len(examples))
        for batch in _batches(tokens.lengths[start:stop].tolist(), cfg.batch_tokens):
            ids, mask, _ = _pad(tokens, [start + j for j in batch], pad_id, cfg.padding_side)
            out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return out


def rss_child(n: int, model: str, device: str) -> None:
    """Extract n statements; print peak RSS and the load time as JSON (run in a fresh process)."""
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (transformers imports lazily)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_model(model, device=device)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        extract(loaded, many_statements(n), Path(tmp) / "m.h5", ExtractConfig(), progress=False)
    print(json.dumps({"n": n, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "import_s": import_s, "first_load_s": load_s}))


def read_speed(rows: int, picks: int = 1024) -> None:
    """Scattered-row reads of a (rows, 30, 9, 64) fp16 store: Store.activations vs h5py point reads."""
    import h5py

    from headprobe.extract.store import Store, StoreMeta, StoreWriter

    rng = np.random.default_rng(0)
    shape = (30, 9, 64)
    meta = StoreMeta(model_id="synthetic", weights_hash="0", architecture="llama", hook_point="-", n_layers=30,
                     layers=list(range(30)), n_heads=9, n_kv_heads=3, d_head=64, d_model=576, dtype="float16",
                     position_rule="all", padding_side="right", bos=False, task="synthetic", stage="",
                     label_names=[], label_kind="none", dataset_hash="0", n_examples=rows, n_rows=rows,
                     has_writes=False, headprobe_version="bench", created="-")
    with tempfile.TemporaryDirectory() as tmp:
        writer = StoreWriter(Path(tmp) / "r.h5", meta, np.int64, resume=False)
        for start in range(0, rows, 1024):
            n = min(1024, rows - start)
            writer.write_block(n, {"z": rng.standard_normal((n, *shape)).astype(np.float16),
                                   **{k: np.zeros(n, dt) for k, dt in (("token_id", np.int32), ("position", np.int32),
                                      ("group", np.int64), ("split", np.int8), ("label", np.int64))},
                                   "example_id": np.arange(start, start + n)})
        path = writer.finish()
        idx = rng.choice(rows, picks, replace=False)
        mb = picks * np.prod(shape) * 2 / 1e6
        with Store(path) as store, h5py.File(path, "r") as f:
            store.activations(rows=idx)  # warm the page cache
            t0 = time.perf_counter()
            store.activations(rows=idx, dtype=np.float16)
            t_store = time.perf_counter() - t0
            t0 = time.perf_counter()
            f["z"][np.sort(idx)]
            t_fancy = time.perf_counter() - t0
    print(f"scattered reads, {picks} of {rows} rows ({mb:.0f} MB): Store.activations {mb / t_store:6.0f} MB/s, "
          f"h5py point selection {mb / t_fancy:6.0f} MB/s ({t_fancy / t_store:.1f}x slower)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=256, help="examples of the smaller memory run (the larger has 10x)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); on a "
                   "shared machine 1 thread is often faster than 2")
    p.add_argument("--read-rows", type=int, default=8192, help="rows of the synthetic store for the read test")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        return rss_child(args.rss_child, args.model, args.device)

    load_model(args.model)  # imports and, once ever, the GGUF conversion
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    model, task, cfg = loaded.model, get_task("capitals"), ExtractConfig()
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in forward_batches(loaded, task, cfg)]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"model {loaded.model_id}: {len(batches)} batches, {len(task.examples(0))} examples, {n_tokens} tokens, "
          f"{torch.get_num_threads()} threads; warm load_model: {load_s:.2f} s")

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
            sync()

    def floor() -> None:
        with torch.inference_mode():
            for batch in batches:
                model.base_model(**batch, use_cache=False)
            sync()

    with tempfile.TemporaryDirectory() as tmp:
        def extraction() -> None:
            extract(loaded, task, Path(tmp) / "x.h5", cfg, overwrite=True, progress=False)

        modes = {"extract": extraction, "(a) plain model(**batch)": plain, "(b) floor base_model, no hooks": floor}
        times = {name: [] for name in modes}
        extraction()  # warm-up
        for _ in range(args.rounds):
            for name, fn in modes.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:32s} best {best[name]:6.2f} s  ({n_tokens / best[name]:7.0f} tok/s)   rounds: "
              + " ".join(f"{t:.2f}" for t in ts))
    ext = best["extract"]
    print(f"throughput ratio extract / (a) plain forward : {best['(a) plain model(**batch)'] / ext:.2f}  (goal >= 1.2)")
    print(f"throughput ratio extract / (b) floor         : {best['(b) floor base_model, no hooks'] / ext:.2f}  "
          f"(goal >= 0.9)")

    rss = {}
    for n in (args.n, 10 * args.n):
        threads = ["--threads", str(args.threads)] if args.threads else []
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--model", args.model,
                              "--device", args.device, *threads],
                             capture_output=True, text=True, check=True)
        rss[n] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"peak RSS, {n:6d} examples: {rss[n]['maxrss_mb']:7.0f} MB   (fresh process: transformers import "
              f"{rss[n]['import_s']:.2f} s, then load_model {rss[n]['first_load_s']:.2f} s)")
    small, large = rss[args.n]["maxrss_mb"], rss[10 * args.n]["maxrss_mb"]
    print(f"peak RSS growth N -> 10N: {100 * (large / small - 1):+.1f}%  (goal < 10%)")
    read_speed(args.read_rows)


if __name__ == "__main__":
    main()
