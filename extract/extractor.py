"""Run a model over a task's examples and write per-head z (and optionally head writes) to the store.

Examples are processed in blocks of ``block_examples``; within a block they are sorted by length and batched
under a token budget (little padding), then the block's rows are written in example order and committed.
Only the base model runs (no LM head), and the forward stops right after the last hooked layer.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from headprobe import HeadprobeError
from headprobe.extract.hooks import HeadCapture, StopForward, head_layout, hook_point, output_weights
from headprobe.extract.models import LoadedModel
from headprobe.extract.store import Store, StoreMeta, StoreWriter, partial_path, progress_path
from headprobe.extract.tasks import POSITION_RULES, Example, Task, assign_splits, dataset_hash

STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
STORE_TORCH = {"float16": torch.float16, "float32": torch.float32}


class ExtractError(HeadprobeError, RuntimeError):
    """Bad input or a failed extraction; the message says what to do."""


@dataclass
class ExtractConfig:
    layers: list[int] | None = None  # None: every layer
    positions: str | None = None  # "last", "all" or "task"; None: the task's own rule
    store_dtype: str = "fp16"
    writes: bool = False  # also store each head's residual-stream write z_h @ W_O[h-block]
    padding_side: str = "right"
    batch_tokens: int = 4096  # padded tokens per forward batch
    block_examples: int = 256  # examples per committed block
    seed: int = 0  # task generation and split seed
    max_examples: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "block_examples", "max_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ExtractError(f"--{name.replace('_', '-')} {value}: pass a positive number")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("headprobe")
    except Exception:
        return "0+unknown"


class Tokens:
    """Every example's token ids, flat (int32) with offsets, so memory stays ~4 bytes per token."""

    def __init__(self, tokenizer, examples: list[Example], chunk: int = 1024):
        parts, lengths = [], []
        for i in range(0, len(examples), chunk):
            part = examples[i:i + chunk]
            texts = [ex.text for ex in part if ex.token_ids is None]
            encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
            for ex in part:
                ids = list(ex.token_ids) if ex.token_ids is not None else next(encoded)
                parts.append(np.asarray(ids, dtype=np.int32))
                lengths.append(len(ids))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.flat = np.concatenate(parts) if parts else np.empty(0, np.int32)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]


def prepends_special_tokens(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS (or CLS) token before the text."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and list(with_special[:len(plain)]) != list(plain)


def _positions(ex: Example, length: int, rule: str) -> list[int]:
    """The token positions of ``ex`` that become rows, less those a token labeler left without a label (None)."""
    if rule == "last":
        positions = [length - 1]
    elif rule == "all":
        positions = list(range(length))
    else:
        if ex.position is None:
            raise ExtractError("position rule 'task' needs every example to name a position; use --positions last")
        pos = ex.position if ex.position >= 0 else length + ex.position
        if not 0 <= pos < length:
            raise ExtractError(f"example position {ex.position} is outside its {length} tokens: fix the dataset")
        positions = [pos]
    return positions if ex.token_labels is None else [p for p in positions if ex.token_labels[p] is not None]


def _row_labels(ex: Example, positions: list[int], kind: str) -> list:
    if ex.token_labels is not None:
        return [ex.token_labels[p] for p in positions]
    missing = -1 if kind in ("class", "none") else float("nan")
    return [missing if ex.label is None else ex.label] * len(positions)


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices sorted by length into batches of at most ``budget`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing output or an interrupted run unless told how."""
    partial = partial_path(out)
    if out.exists() and not (overwrite or resume):
        raise ExtractError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if partial.exists() and not (resume or overwrite):
        raise ExtractError(f"{partial} holds an interrupted extraction: pass --resume to continue it, or --overwrite")
    if out.exists() and out.is_dir():
        raise ExtractError(f"{out} is a folder: --out must name a file")


def _pad(tokens: Tokens, idx: list[int], pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, S) input ids and attention mask of the examples ``idx``, and each example's padding shift (B,)."""
    lengths = tokens.lengths[idx]
    width = int(lengths.max())
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    shifts = width - lengths if side == "left" else np.zeros_like(lengths)
    for b, (i, shift) in enumerate(zip(idx, shifts)):
        ids[b, shift:shift + lengths[b]] = tokens[i]
        mask[b, shift:shift + lengths[b]] = 1
    return ids, mask, shifts


def extract(loaded: LoadedModel, task: Task, out: str | Path, config: ExtractConfig | None = None, *,
            resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Extract ``task`` with ``loaded`` into the HDF5 store ``out``; returns the finished path.

    With ``resume`` an interrupted run (``<out>.partial``) continues where its last committed block ended, and a
    finished ``out`` is returned as it is; either is refused if it was made with other settings.
    """
    cfg = config or ExtractConfig()
    out = Path(out)
    check_output(out, resume, overwrite)
    rule = cfg.positions or task.position_rule
    if rule not in POSITION_RULES:
        raise ExtractError(f"unknown position rule {rule!r}: choose one of {', '.join(POSITION_RULES)}")
    if cfg.store_dtype not in STORE_DTYPES:
        raise ExtractError(f"unknown store dtype {cfg.store_dtype!r}: choose fp16 or fp32")
    if cfg.padding_side not in ("left", "right"):
        raise ExtractError(f"unknown padding side {cfg.padding_side!r}: choose left or right")

    model, tok = loaded.model, loaded.tokenizer
    layout = head_layout(model)
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(layout.n_layers))
    if not layers or layers[0] < 0 or layers[-1] >= layout.n_layers:
        raise ExtractError(f"--layers must lie in 0..{layout.n_layers - 1} for this model")

    examples = task.examples(cfg.seed)[: cfg.max_examples]
    if not examples:
        raise ExtractError(f"task {task.name!r} has no examples: check the data file")
    tokens = Tokens(tok, examples)
    if tokens.lengths.min() == 0:
        raise ExtractError(f"example {int(np.argmin(tokens.lengths))} of task {task.name!r} is empty: fix the data")
    if task.token_labeler is not None:  # labels that depend on the tokenization
        examples = [replace(ex, token_labels=task.token_labeler(tokens[i].tolist(), tok))
                    for i, ex in enumerate(examples)]
    rows_per = np.array([len(_positions(ex, int(n), rule)) for ex, n in zip(examples, tokens.lengths)])
    row_offsets = np.concatenate([[0], np.cumsum(rows_per)])
    keys = [ex.group or str(i) for i, ex in enumerate(examples)]  # an example without a group is its own group
    splits = assign_splits(keys, task.split_fractions, cfg.seed)
    group_ids = {g: i for i, g in enumerate(sorted(set(keys)))}
    groups = np.array([group_ids[k] for k in keys], dtype=np.int64)

    store_dtype = np.dtype(STORE_DTYPES[cfg.store_dtype])
    settings = {k: v for k, v in asdict(cfg).items() if k != "max_examples"}
    settings.update(layers=layers, positions=rule, model_dtype=str(next(model.parameters()).dtype),
                    n_examples=len(examples))
    meta = StoreMeta(
        model_id=loaded.model_id, weights_hash=loaded.weights_hash, architecture=model.config.model_type,
        hook_point=hook_point(model), n_layers=layout.n_layers, layers=layers, n_heads=layout.n_heads,
        n_kv_heads=layout.n_kv_heads, d_head=layout.d_head, d_model=layout.d_model, dtype=store_dtype.name,
        position_rule=rule, padding_side=cfg.padding_side, bos=prepends_special_tokens(tok), task=task.name,
        stage=task.stage, label_names=list(task.label_names), label_kind=task.label_kind,
        dataset_hash=dataset_hash(examples), n_examples=len(examples), n_rows=int(row_offsets[-1]),
        has_writes=cfg.writes, headprobe_version=_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), config=settings)
    resumable = resume and partial_path(out).exists() and progress_path(out).exists()
    if out.exists() and not overwrite and not resumable:  # resume of a finished run
        with Store(out) as done:
            why = done.meta.mismatch(meta)
        if why:
            raise ExtractError(f"{out} was made with another model, task or configuration ({why}): pass "
                               f"--overwrite to replace it, or choose another --out")
        progress_path(out).unlink(missing_ok=True)
        return out

    device = next(model.parameters()).device
    w_o = constants = None
    if cfg.writes:
        w_o, b_o = (t.float() for t in output_weights(model, layers))  # (L, H, D, d_model), (L, d_model)
        constants = {"out_bias": b_o.cpu().numpy().astype(store_dtype)}
    label_dtype = np.int64 if task.label_kind in ("class", "none") else np.float32
    # an existing ``out`` is only replaced (atomically) when the new file is complete
    writer = StoreWriter(out, meta, label_dtype, resume=resume and not overwrite, constants=constants)
    params = inspect.signature(model.base_model.forward).parameters
    static = {"use_cache": False} if "use_cache" in params else {}
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    # z goes straight into the store dtype unless head writes need it in fp32 first
    capture_dtype = torch.float32 if cfg.writes or store_dtype == np.float32 else torch.float16

    bar = tqdm(total=len(examples), initial=writer.examples_done, unit="ex", desc=f"extract {task.name}",
               disable=not progress, dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    try:
        with HeadCapture(model, layers, out_dtype=capture_dtype) as cap, torch.inference_mode():
            for start in range(writer.examples_done, len(examples), cfg.block_examples):
                stop = min(start + cfg.block_examples, len(examples))
                base = row_offsets[start]
                n_rows = int(row_offsets[stop] - base)
                block = {"z": np.empty((n_rows, len(layers), layout.n_heads, layout.d_head), store_dtype),
                         "token_id": np.empty(n_rows, np.int32), "position": np.empty(n_rows, np.int32),
                         "label": np.empty(n_rows, label_dtype)}
                if cfg.writes:
                    block["write"] = np.empty((n_rows, len(layers), layout.n_heads, layout.d_model), store_dtype)
                for batch in _batches(tokens.lengths[start:stop].tolist(), cfg.batch_tokens):
                    idx = [start + j for j in batch]
                    ids, mask, shifts = _pad(tokens, idx, pad_id, cfg.padding_side)
                    b_index, p_index, dest = [], [], []
                    for b, i in enumerate(idx):
                        pos = _positions(examples[i], int(tokens.lengths[i]), rule)
                        rows = np.arange(row_offsets[i], row_offsets[i + 1]) - base
                        b_index += [b] * len(pos)
                        p_index += [p + int(shifts[b]) for p in pos]
                        dest.append(rows)
                        block["position"][rows] = pos
                        block["token_id"][rows] = tokens[i][pos]
                        block["label"][rows] = _row_labels(examples[i], pos, task.label_kind)
                    if not b_index:  # no row wanted from these examples: nothing to run
                        continue
                    cap.select(torch.tensor(b_index, dtype=torch.long, device=device),
                               torch.tensor(p_index, dtype=torch.long, device=device))
                    kwargs = {"input_ids": torch.from_numpy(ids).to(device),
                              "attention_mask": torch.from_numpy(mask).to(device)}
                    if "position_ids" in params:
                        kwargs["position_ids"] = torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)).to(device)
                    try:
                        model.base_model(**kwargs, **static)
                    except StopForward:
                        pass
                    dest = np.concatenate(dest)
                    block["z"][dest] = _finite(cap.z.to(STORE_TORCH[store_dtype.name]), task, idx)
                    if cfg.writes:
                        write = torch.einsum("rlhd,lhdm->rlhm", cap.z, w_o).to(STORE_TORCH[store_dtype.name])
                        block["write"][dest] = _finite(write, task, idx)
                    tokens_seen += int(mask.sum())
                ex_ids = np.repeat(np.arange(start, stop), rows_per[start:stop])
                block.update(example_id=ex_ids, group=groups[ex_ids], split=splits[ex_ids])
                writer.write_block(stop - start, block)
                bar.update(stop - start)
                bar.set_postfix_str(f"{tokens_seen / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
        bar.close()
        return writer.finish()
    except ExtractError:
        writer.discard()  # a rerun with the same settings would fail the same way
        raise
    finally:
        bar.close()
        writer.close()


def _finite(x: torch.Tensor, task: Task, idx: list[int]) -> np.ndarray:
    if not torch.isfinite(x).all():
        raise ExtractError(f"non-finite activations in examples {min(idx)}..{max(idx)} of task {task.name!r}: "
                           f"extract with --store-dtype fp32 or a wider --dtype")
    return x.cpu().numpy()
