"""GPU check: the CUDA paths of extraction, probes and SAEs in one short run (about a minute on an H100).

    python bench/gpu_check.py                      # a random 12-layer x 12-head x 64 Llama built from a config
    python bench/gpu_check.py --model /path/folder # a local Hugging Face model folder instead (no downloads)

Sections (each one catches and prints its own failure, so one broken path does not hide the others):

1. capture (torch + transformers only): z of every head at the last token with the model in fp32, fp16, bf16:
   tokens/s and the relative error of z against fp32
2. extract: the same through the real extractor and HDF5 store (needs h5py)
3. device_map: half of the model on the GPU, half mapped to the CPU (accelerate): z and W_O against one device
4. probes: per-head linear probes (Newton) under Lightning, fp32 vs bf16-mixed: s per fit, val accuracy
5. sae: TopK SAE training, fp32 vs bf16-mixed, and FSDP on one GPU: tokens/s and train FVE
6. ddp: DDP with one GPU (nccl process group, rank-sharded data): a probe fit

Sections 1 and 3 need only torch, transformers and accelerate; the others also the project's dependencies
(h5py, lightning). Nothing is downloaded. Everything is
written under a temporary folder that is removed at the end. Prints one table row per measurement.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # (section, setting, value, note)
ACCEL = "gpu"  # Lightning accelerator ("cpu" for a dry run)


def row(section: str, setting: str, value: str, note: str = "") -> None:
    ROWS.append((section, setting, value, note))
    print(f"  {section:11} {setting:28} {value:>16}  {note}", flush=True)


def section(name: str):
    """Decorator: run a section, print its failure instead of stopping."""
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                out = fn(*args, **kwargs)
                print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
                return out
            except Exception as err:  # noqa: BLE001 - report and go on
                row(name, "FAILED", type(err).__name__, str(err).splitlines()[0][:140] if str(err) else "")
                traceback.print_exc(limit=4)
                return None
        return run
    return wrap


class ByteTokenizer:
    """A stand-in tokenizer for the random model (the examples come pre-tokenised)."""

    pad_token_id, bos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens: bool = True):
        enc = lambda t: ([1] if add_special_tokens else []) + [3 + b for b in t.encode()]
        return {"input_ids": enc(texts) if isinstance(texts, str) else [enc(t) for t in texts]}


def random_llama(layers: int, heads: int, d_head: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=heads * d_head, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads // 3, head_dim=d_head, intermediate_size=4 * heads * d_head,
                      vocab_size=32000, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def loaded_model(args, dtype: str, device):
    """A LoadedModel: the local folder if given, else the random Llama (same weights every call)."""
    from headprobe.extract.models import LoadedModel, load_model, weights_fingerprint

    if args.model:
        return load_model(args.model, dtype=dtype, device=str(device))
    model = random_llama(args.layers, args.heads, args.d_head).to({"fp32": torch.float32, "fp16": torch.float16,
                                                                  "bf16": torch.bfloat16}[dtype]).to(device)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), model_id="random-llama",
                       weights_hash=weights_fingerprint(model))


def random_task(n: int, length: int, vocab: int, positions: str = "last"):
    from headprobe.extract.tasks import Example, Task

    rng = np.random.default_rng(0)
    examples = [Example(token_ids=[1] + rng.integers(3, vocab, length - 1).tolist(), group=str(i)) for i in range(n)]
    return Task(name="random_tokens", stage="", description="random tokens", label_names=[], make=lambda s: examples,
                position_rule=positions, label_kind="none", metric="none")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def hooks_module():
    """extract.hooks (torch only), loaded from its file if the package's other dependencies (h5py) are missing."""
    try:
        import headprobe.extract.hooks as hooks
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("headprobe_hooks", ROOT / "extract" / "hooks.py")
        hooks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hooks)
    return hooks


def bare_model(args, dtype: str, device):
    """The model alone (torch + transformers): the local folder, else the random Llama."""
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if args.model:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype).eval().to(device)
    return random_llama(args.layers, args.heads, args.d_head).to(torch_dtype).to(device)


def capture_z(model, ids: torch.Tensor, batch: int, hooks) -> tuple[torch.Tensor, float]:
    """z (N, L, H, D) float32 of every layer at the last position of each row of ids (N, S), and the wall time
    of the timed pass (after one warm-up batch)."""
    n_layers = len(hooks.out_projections(model))
    device = next(model.parameters()).device
    out = []
    with hooks.HeadCapture(model, list(range(n_layers))) as cap, torch.inference_mode():
        for timed in (False, True):
            sync()
            t0 = time.perf_counter()
            for i in range(0, len(ids) if timed else batch, batch):
                x = ids[i:i + batch].to(device)
                cap.select(torch.arange(len(x), device=device), torch.full((len(x),), x.shape[1] - 1, device=device))
                try:
                    model.base_model(input_ids=x, use_cache=False)
                except hooks.StopForward:
                    pass
                if timed:
                    out.append(cap.z.float().cpu())
            sync()
    return torch.cat(out), time.perf_counter() - t0


@section("capture")
def check_capture(args, tmp: Path, dev) -> None:
    """HeadCapture on the bare model, needing only torch and transformers."""
    hooks = hooks_module()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256 if args.model else 32000, (args.sequences, args.seq_len), generator=g)
    batch = max(1, args.batch_tokens // args.seq_len)
    ref = None
    for dtype in ("fp32", "fp16", "bf16"):
        model = bare_model(args, dtype, dev)
        z, wall = capture_z(model, ids, batch, hooks)
        ref = z if ref is None else ref
        row("capture", f"model {dtype}", f"{ids.numel() / wall:,.0f} tok/s",
            f"z rel. error vs fp32 {rel_err(z.numpy(), ref.numpy()):.2e}; finite {bool(torch.isfinite(z).all())}")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@section("extract")
def check_extraction(args, tmp: Path, dev) -> None:
    from headprobe.extract import ExtractConfig, Store, extract

    vocab = 256 if args.model else 32000
    task = random_task(args.sequences, args.seq_len, vocab)
    ref = None
    for dtype in ("fp32", "fp16", "bf16"):
        loaded = loaded_model(args, dtype, dev)
        cfg = ExtractConfig(store_dtype="fp32", batch_tokens=args.batch_tokens)
        extract(loaded, random_task(8, args.seq_len, vocab), tmp / f"warm_{dtype}.h5", cfg, progress=False)
        sync()
        t0 = time.perf_counter()
        path = extract(loaded, task, tmp / f"x_{dtype}.h5", cfg, progress=False)
        sync()
        wall = time.perf_counter() - t0
        with Store(path) as s:
            z = s.activations()
        ref = z if ref is None else ref
        row("extract", f"model {dtype}", f"{args.sequences * args.seq_len / wall:,.0f} tok/s",
            f"z rel. error vs fp32 {rel_err(z, ref):.2e}; finite {bool(np.isfinite(z).all())}")
        del loaded
        torch.cuda.empty_cache()


@section("device_map")
def check_device_map(args, tmp: Path, dev) -> None:
    """Half of the model's memory on cuda:0, the rest mapped to the CPU by accelerate: every head still captured,
    and W_O (for --writes) gathered on the input device."""
    from accelerate import dispatch_model, infer_auto_device_map

    hooks = hooks_module()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256 if args.model else 32000, (64, 128), generator=g)
    one = bare_model(args, "fp32", dev)
    z1, _ = capture_z(one, ids, 32, hooks)
    w1 = hooks.output_weights(one, list(range(len(hooks.out_projections(one)))))[0].cpu()
    del one
    split = bare_model(args, "fp32", "cpu")
    size = sum(p.numel() * p.element_size() for p in split.parameters())
    device_map = infer_auto_device_map(split, max_memory={0: size // 2, "cpu": 4 * size},
                                       no_split_module_classes=split._no_split_modules)
    split = dispatch_model(split, device_map=device_map)
    on_cpu = sum(d == "cpu" for d in device_map.values())
    setting = f"{len(device_map) - on_cpu} modules cuda:0, {on_cpu} cpu"
    z2, _ = capture_z(split, ids, 32, hooks)
    row("device_map", setting, f"{rel_err(z2.numpy(), z1.numpy()):.2e}",
        f"z rel. error vs one device, {z2.shape[1]} layers x {z2.shape[2]} heads (accelerate runs CPU-mapped "
        f"modules on cuda:0, weights in CPU memory)")
    try:
        w2 = hooks.output_weights(split, list(range(len(hooks.out_projections(split)))))[0].cpu()
        row("device_map", f"{setting}, W_O", f"{rel_err(w2.numpy(), w1.numpy()):.2e}", "W_O of every head vs one device")
    except Exception as err:  # noqa: BLE001 - offloaded weights live on the meta device
        row("device_map", f"{setting}, W_O", "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")


def planted_store(tmp: Path) -> Path:
    """A store whose 144 heads carry a binary label with increasing strength (tests/test_distributed_train.py)."""
    from tests.test_distributed_train import synthetic_store

    path = tmp / "planted.h5"
    return path if path.exists() else synthetic_store(path, n=4000, layers=12, heads=12, d_head=64)


def fit_probes(store: Path, out: Path, **trainer):
    """Linear probes on ``store`` through :func:`headprobe.fit` on one device; ``trainer``: more Trainer settings."""
    from headprobe.train.fit import fit

    return fit("linear", store, out, {"model": {"init_args": {"controls": []}},
                                      "trainer": {"accelerator": ACCEL, "devices": 1, **trainer}},
               logger="none", test=False, quiet=True)


def val_acc(result) -> np.ndarray:
    """(layers, heads) val accuracy of a FitResult's main task."""
    return np.asarray(result.metrics["val"]["acc"])[0]


@section("probes")
def check_probes(args, tmp: Path, dev) -> None:
    store = planted_store(tmp)
    ref = None
    for precision in ("32-true", "bf16-mixed"):
        t0 = time.perf_counter()
        acc = val_acc(fit_probes(store, tmp / f"probe_{precision}", precision=precision))
        wall = time.perf_counter() - t0
        ref = acc if ref is None else ref
        row("probes", f"Newton, 144 heads, {precision}", f"{wall:.1f} s/fit",
            f"val acc mean {acc.mean():.4f}; max |diff| vs fp32 {np.abs(acc - ref).max():.4f}")


@section("sae")
def check_sae(args, tmp: Path, dev) -> None:
    import lightning as L

    from headprobe.extract import ExtractConfig, extract
    from headprobe.probes.sae import SparseAutoencoder
    from headprobe.train.data import StoreDataModule

    loaded = loaded_model(args, "bf16", dev)
    layer = len(hooks_module().out_projections(loaded.model)) // 2
    task = random_task(args.sae_sequences, args.seq_len, 256 if args.model else 32000, positions="all")
    store = extract(loaded, task, tmp / "sae.h5", ExtractConfig(layers=[layer]), progress=False)
    del loaded
    torch.cuda.empty_cache()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == args.warmup:
                sync()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            sync()
            self.wall = time.perf_counter() - self.t0

    for precision, strategy in (("32-true", "auto"), ("bf16-mixed", "auto"), ("32-true", "fsdp")):
        try:
            dm = StoreDataModule(str(store), batch_size=args.sae_batch, in_memory=True)
            sae = SparseAutoencoder(architecture="topk", expansion=8, k=32, b_dec_init="mean", init_rows=8192)
            clock = Clock()
            trainer = L.Trainer(max_steps=args.sae_steps, accelerator=ACCEL, devices=1, precision=precision,
                                strategy=strategy, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0, callbacks=[clock])
            trainer.fit(sae, dm)
            tokens = (args.sae_steps - args.warmup) * args.sae_batch
            fve = trainer.callback_metrics.get("train/fve")
            row("sae", f"TopK {sae.d_in}x{sae.d_sae} {precision} {strategy}", f"{tokens / clock.wall:,.0f} tok/s",
                f"train FVE {float(fve):.3f} after {args.sae_steps} steps" if fve is not None else "")
        except Exception as err:  # noqa: BLE001
            row("sae", f"{precision} {strategy}", "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            traceback.print_exc(limit=4)


@section("ddp")
def check_ddp(args, tmp: Path, dev) -> None:
    store = planted_store(tmp)
    acc = val_acc(fit_probes(store, tmp / "probe_ddp", strategy="ddp"))
    import torch.distributed as dist
    backend = dist.get_backend() if dist.is_initialized() else "none"
    row("ddp", "1 device, strategy ddp", backend, f"val acc mean {acc.mean():.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description="check headprobe's CUDA paths")
    p.add_argument("--model", default=None, help="local model folder (default: a random Llama from a config)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--sequences", type=int, default=512, help="sequences for the extraction throughput")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--sae-sequences", type=int, default=128, help="sequences whose every token trains the SAE")
    p.add_argument("--sae-batch", type=int, default=4096)
    p.add_argument("--sae-steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None,
                   help="sections to run (capture extract device_map probes sae ddp)")
    p.add_argument("--cpu", action="store_true", help="dry run of the same code on the CPU (small sizes advised)")
    args = p.parse_args()
    global ACCEL
    if args.cpu:
        ACCEL, dev, device_name = "cpu", torch.device("cpu"), "CPU dry run"
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --cpu for a dry run)")
    else:
        dev, device_name = torch.device("cuda:0"), torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {device_name}, bf16 "
          f"{torch.cuda.is_available() and torch.cuda.is_bf16_supported()}; "
          f"model {args.model or f'random Llama {args.layers}x{args.heads}x{args.d_head}'}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    checks = {"capture": check_capture, "extract": check_extraction, "device_map": check_device_map,
              "probes": check_probes, "sae": check_sae, "ddp": check_ddp}
    if args.cpu:
        checks.pop("device_map")  # needs a GPU
    try:
        for name, fn in checks.items():
            if args.only is None or name in args.only:
                fn(args, tmp, dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s, {device_name})")
    for r in ROWS:
        print(" | ".join(r))


if __name__ == "__main__":
    main()
