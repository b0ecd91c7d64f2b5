"""Run a model over a task's examples and write per-head z (and optionally head writes) to the store.

Examples are processed in blocks of ``block_examples``; within a block they are sorted by length and batched
under a token budget (little padding), then the block's rows are written in example order and committed.
Only the base model runs (no LM head), and the forward stops right after the last hooked layer.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.hooks import HeadCapture, StopForward, head_layout, hook_point, output_weights
from extract.models import LoadedModel
from extract.store import StoreError, StoreMeta, StoreWriter
from extract.tasks import POSITION_RULES, Example, Task, assign_splits, dataset_hash

STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


class ExtractError(RuntimeError):
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


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("headprobe")
    except Exception:
        return "0+unknown"


def tokenize(tokenizer, examples: list[Example]) -> list[list[int]]:
    texts = [ex.text for ex in examples if ex.token_ids is None]
    encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
    return [list(ex.token_ids) if ex.token_ids is not None else next(encoded) for ex in examples]


def _positions(ex: Example, length: int, rule: str) -> list[int]:
    if rule == "last":
        return [length - 1]
    if rule == "all":
        return list(range(length))
    if ex.position is None:
        raise ExtractError("position rule 'task' needs every example to name a position; use --positions last")
    pos = ex.position if ex.position >= 0 else length + ex.position
    if not 0 <= pos < length:
        raise ExtractError(f"example position {ex.position} is outside its {length} tokens: fix the dataset")
    return [pos]


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


def extract(loaded: LoadedModel, task: Task, out: str | Path, config: ExtractConfig | None = None, *,
            resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Extract ``task`` with ``loaded`` into the HDF5 store ``out``; returns the finished path."""
    cfg = config or ExtractConfig()
    out = Path(out)
    partial = Path(str(out) + ".partial")
    if out.exists() and not overwrite:
        if resume:
            return out
        raise ExtractError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if partial.exists() and not (resume or overwrite):
        raise ExtractError(f"{partial} holds an interrupted extraction: pass --resume to continue it, or --overwrite")
    if overwrite:
        out.unlink(missing_ok=True)
    rule = cfg.positions or task.position_rule
    if rule not in POSITION_RULES:
        raise ExtractError(f"unknown position rule {rule!r}: choose one of {', '.join(POSITION_RULES)}")
    if cfg.store_dtype not in STORE_DTYPES:
        raise ExtractError(f"unknown store dtype {cfg.store_dtype!r}: choose fp16 or fp32")

    model, tok = loaded.model, loaded.tokenizer
    layout = head_layout(model)
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(layout.n_layers))
    if not layers or layers[0] < 0 or layers[-1] >= layout.n_layers:
        raise ExtractError(f"--layers must lie in 0..{layout.n_layers - 1} for this model")

    examples = task.examples(cfg.seed)[: cfg.max_examples]
    if not examples:
        raise ExtractError(f"task {task.name!r} has no examples: check the data file")
    ids_all = tokenize(tok, examples)
    lengths = [len(x) for x in ids_all]
    if min(lengths) == 0:
        raise ExtractError(f"example {lengths.index(0)} of task {task.name!r} is empty: fix the data")
    rows_per = [len(_positions(ex, n, rule)) for ex, n in zip(examples, lengths)]
    splits = assign_splits([ex.group or str(i) for i, ex in enumerate(examples)], task.split_fractions, cfg.seed)
    groups = {g: i for i, g in enumerate(sorted({ex.group for ex in examples}))}

    store_dtype = np.dtype(STORE_DTYPES[cfg.store_dtype])
    probe = tok("a", add_special_tokens=True)["input_ids"] if hasattr(tok, "__call__") else []
    bos = bool(probe) and probe != tok("a", add_special_tokens=False)["input_ids"][: len(probe)]
    settings = {k: v for k, v in asdict(cfg).items() if k != "max_examples"}
    settings.update(layers=layers, positions=rule, model_dtype=str(next(model.parameters()).dtype),
                    n_examples=len(examples))
    meta = StoreMeta(
        model_id=loaded.model_id, weights_hash=loaded.weights_hash, architecture=model.config.model_type,
        hook_point=hook_point(model), n_layers=layout.n_layers, layers=layers, n_heads=layout.n_heads,
        n_kv_heads=layout.n_kv_heads, d_head=layout.d_head, d_model=layout.d_model, dtype=store_dtype.name,
        position_rule=rule, padding_side=cfg.padding_side, bos=bos, task=task.name, stage=task.stage,
        label_names=list(task.label_names), label_kind=task.label_kind, dataset_hash=dataset_hash(examples),
        n_examples=len(examples), n_rows=int(sum(rows_per)), has_writes=cfg.writes,
        headprobe_version=_version(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=settings)
    label_dtype = np.int64 if task.label_kind in ("class", "none") else np.float32
    writer = StoreWriter(out, meta, label_dtype, resume=resume)
    device = next(model.parameters()).device
    w_o = b_o = None
    if cfg.writes:
        w_o, b_o = (t.float() for t in output_weights(model, layers))
        writer.set("out_bias", b_o.cpu().numpy().astype(store_dtype))
    params = inspect.signature(model.base_model.forward).parameters
    accepts_pos = "position_ids" in params
    extra_kwargs = {"use_cache": False} if "use_cache" in params else {}
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0

    bar = tqdm(total=len(examples), initial=writer.examples_done, unit="ex", desc=f"extract {task.name}",
               disable=not progress, dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    try:
        with HeadCapture(model, layers, out_dtype=torch.float32) as cap, torch.inference_mode():
            for start in range(writer.examples_done, len(examples), cfg.block_examples):
                stop = min(start + cfg.block_examples, len(examples))
                offsets = np.concatenate([[0], np.cumsum(rows_per[start:stop])])
                n_rows = int(offsets[-1])
                block = {"z": np.empty((n_rows, len(layers), layout.n_heads, layout.d_head), store_dtype)}
                if cfg.writes:
                    block["write"] = np.empty((n_rows, len(layers), layout.n_heads, layout.d_model), store_dtype)
                cols = {k: [None] * (stop - start) for k in ("token_id", "position", "label")}
                for batch in _batches(lengths[start:stop], cfg.batch_tokens):
                    idx = [start + j for j in batch]
                    width = max(lengths[i] for i in idx)
                    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(idx), width), dtype=torch.long)
                    b_index, p_index = [], []
                    for b, i in enumerate(idx):
                        n = lengths[i]
                        shift = width - n if cfg.padding_side == "left" else 0
                        ids[b, shift:shift + n] = torch.tensor(ids_all[i])
                        mask[b, shift:shift + n] = 1
                        pos = _positions(examples[i], n, rule)
                        b_index += [b] * len(pos)
                        p_index += [p + shift for p in pos]
                        j = i - start
                        cols["position"][j] = pos
                        cols["token_id"][j] = [ids_all[i][p] for p in pos]
                        cols["label"][j] = _row_labels(examples[i], pos, task.label_kind)
                    cap.select(torch.tensor(b_index, device=device), torch.tensor(p_index, device=device))
                    kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
                    if accepts_pos:
                        kwargs["position_ids"] = ((mask.cumsum(-1) - 1).clamp(min=0)).to(device)
                    try:
                        model.base_model(**kwargs, **extra_kwargs)
                    except StopForward:
                        pass
                    z = cap.z
                    zs = z.to(torch.float16) if store_dtype == np.float16 else z
                    if not torch.isfinite(zs).all():
                        raise ExtractError(f"non-finite activations in examples {idx[0]}..{idx[-1]} of task "
                                           f"{task.name!r}: extract with --store-dtype fp32 or a wider --dtype")
                    dest = np.concatenate([np.arange(offsets[i - start], offsets[i - start + 1]) for i in idx])
                    block["z"][dest] = zs.cpu().numpy()
                    if cfg.writes:
                        block["write"][dest] = torch.einsum("rlhd,lhdm->rlhm", z.float(), w_o).cpu().numpy()
                    tokens_seen += int(mask.sum())
                cat = lambda k: np.concatenate([np.asarray(v) for v in cols[k]])
                ex_ids = np.repeat(np.arange(start, stop), rows_per[start:stop])
                block.update(
                    token_id=cat("token_id"), position=cat("position"), label=cat("label"), example_id=ex_ids,
                    group=np.array([groups[examples[i].group] for i in ex_ids]), split=splits[ex_ids])
                writer.write_block(stop - start, block)
                rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(stop - start)
                bar.set_postfix_str(f"{rate:,.0f} tok/s")
        bar.close()
        return writer.finish()
    except (ExtractError, StoreError):
        raise
    finally:
        bar.close()
        writer.close()
