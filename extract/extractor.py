"""Run a model over a task's examples and write per-head z (and optionally head writes) to the store.

Examples are processed in blocks of ``block_examples``; within a block they are sorted by length and batched
under a token budget (little padding), then the block's rows are written in example order and committed.
Only the base model runs (no LM head), and the forward stops right after the last hooked layer.

Everything that can be refused is checked before the first forward, and by the command line before the model's
weights load (:func:`preflight`, from the model's config and tokenizer): the settings, the layers, inputs longer
than the model's context, user data too small for the splits, and whether the store fits on its disk.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from headprobe import HeadprobeError
from headprobe.extract.hooks import HeadCapture, HeadLayout, StopForward, head_layout, hook_point, output_weights
from headprobe.extract.models import LoadedModel
from headprobe.extract.store import (Store, StoreMeta, StoreWriter, check_free_space, existing_folder, partial_path,
                                     progress_path, store_bytes)
from headprobe.extract.tasks import POSITION_RULES, Example, Task, assign_splits, dataset_hash
from headprobe.extract.tasks.user import require_every_split, where_is

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
    truncate: bool = False  # cut inputs longer than the model's context (see fit_context) instead of refusing them

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "block_examples", "max_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ExtractError(f"--{name} {value}: pass a positive number")


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

    def keep_ends(self, limit: int, head: list[int]) -> None:
        """Cut every example longer than ``limit`` to its first ``head[i]`` tokens (a prepended BOS) and its last
        ``limit - head[i]``."""
        parts = [np.concatenate([self[i][:head[i]], self[i][n - limit + head[i]:]]) if n > limit else self[i]
                 for i, n in enumerate(self.lengths)]
        self.lengths = np.minimum(self.lengths, limit)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.flat = np.concatenate(parts) if parts else np.empty(0, np.int32)


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
    """Refuse an --out that is a folder or cannot be written, and an existing output or an interrupted run unless
    told what to do with it."""
    out, partial = Path(out), partial_path(out)
    if out.is_dir():
        raise ExtractError(f"--out {out} is a folder: pass a file path, such as {out / 'store.h5'}")
    if out.exists() and not (overwrite or resume):
        raise ExtractError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if partial.exists() and not (resume or overwrite):
        raise ExtractError(f"{partial} holds an interrupted extraction: pass --resume to continue it, or --overwrite")
    folder = existing_folder(out.parent)
    try:  # a real file: permission bits do not tell (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(prefix=".headprobe-", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ExtractError(f"--out {out}: cannot write in {folder} ({(err.strerror or str(err)).lower()}): pass a "
                           f"path in a folder you can write to") from None


def context_limit(config) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or ``n_positions``); None: no limit known."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_layout(config) -> HeadLayout | None:
    """The head layout a config describes (no weights needed); None where it does not say."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    n_layers = get("num_hidden_layers", "n_layer", "num_layers")
    n_heads = get("num_attention_heads", "n_head", "n_heads")
    d_model = get("hidden_size", "n_embd", "dim")
    if not all(isinstance(v, int) and v > 0 for v in (n_layers, n_heads, d_model)):
        return None
    return HeadLayout(n_layers, n_heads, get("num_key_value_heads") or n_heads, get("head_dim") or d_model // n_heads,
                      d_model)


def _check_settings(cfg: ExtractConfig, task: Task) -> str:
    """The position rule to use, after checking the settings that need no model."""
    rule = cfg.positions or task.position_rule
    if rule not in POSITION_RULES:
        raise ExtractError(f"unknown position rule {rule!r}: choose one of {', '.join(POSITION_RULES)}")
    if cfg.store_dtype not in STORE_DTYPES:
        raise ExtractError(f"unknown store dtype {cfg.store_dtype!r}: choose fp16 or fp32")
    if cfg.padding_side not in ("left", "right"):
        raise ExtractError(f"unknown padding side {cfg.padding_side!r}: choose left or right")
    return rule


def _layers(cfg: ExtractConfig, n_layers: int) -> list[int]:
    layers = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(n_layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ExtractError(f"--layers {','.join(map(str, cfg.layers or [])) or '(none)'}: this model has layers "
                           f"0..{n_layers - 1}: --layers must lie in 0..{n_layers - 1}")
    return layers


def _store_size(plan: Plan, layout: HeadLayout, layers: list[int], cfg: ExtractConfig) -> int:
    return store_bytes(plan.n_rows, len(layers), layout.n_heads, layout.d_head,
                       np.dtype(STORE_DTYPES[cfg.store_dtype]).itemsize, layout.d_model if cfg.writes else 0)


@dataclass
class Plan:
    """What an extraction stores, known from the task and the tokenizer alone (before the weights load)."""

    rule: str  # the position rule
    examples: list[Example]  # as stored (after --max-examples, truncation and token labelling)
    tokens: Tokens
    rows_per: np.ndarray  # (N,) rows of each example
    row_offsets: np.ndarray  # (N + 1,) first row of each example
    splits: np.ndarray  # (N,) 0 train, 1 val, 2 test
    groups: np.ndarray  # (N,) leakage group id

    @property
    def n_rows(self) -> int:
        return int(self.row_offsets[-1])


def _where(task: Task, i: int, ex: Example) -> str:
    return where_is(task, ex) or f"example {i} of task {task.name!r}"


def fit_context(task: Task, examples: list[Example], tokens: Tokens, limit: int | None, truncate: bool,
                bos: bool) -> list[Example]:
    """Refuse inputs longer than the model's ``limit`` tokens, naming the first (file and line for user data); with
    ``truncate``, cut them instead (``tokens`` in place).

    Truncation keeps an input's end, so the "last" rule still reads its final token: the first tokens go, except a
    BOS that the tokenizer prepends. Under "all" the cut tokens get no row. A "task" position in the kept part
    moves with its token; one in the cut part is refused (give it from the end, as a negative index, instead).
    Returns the examples with positions and per-token labels moved to match.
    """
    long = np.flatnonzero(tokens.lengths > limit) if limit else []
    if len(long) and not truncate:
        i, more = int(long[0]), f" ({len(long)} inputs are too long)" if len(long) > 1 else ""
        raise ExtractError(f"{_where(task, i, examples[i])}: {int(tokens.lengths[i]):,} tokens, more than the "
                           f"model's {limit:,} positions{more}: shorten it, or pass --truncate to keep the last "
                           f"{limit:,} tokens")
    if not len(long):
        return examples
    head = [int(bos and ex.token_ids is None) for ex in examples]
    lengths, examples = tokens.lengths.copy(), list(examples)
    tokens.keep_ends(limit, head)
    for i in map(int, long):
        ex, n, keep_from = examples[i], int(lengths[i]), int(lengths[i]) - limit + head[i]
        position = ex.position
        if position is not None and -n <= position < n and not (position < 0 and n + position >= keep_from):
            at = position % n
            if head[i] <= at < keep_from:
                raise ExtractError(f"{_where(task, i, ex)}: position {position} falls in the {keep_from - head[i]} "
                                   f"tokens that --truncate cuts from the start: give it from the end (a negative "
                                   f"index), or shorten the text")
            position = at if at < head[i] else at - (n - limit)
        labels = ex.token_labels and ex.token_labels[:head[i]] + ex.token_labels[keep_from:]
        examples[i] = replace(ex, position=position, token_labels=labels)
    return examples


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


def plan_extraction(task: Task, tokenizer, config, cfg: ExtractConfig) -> Plan:
    """Examples, tokens, rows and splits of ``task`` under ``cfg``, for a model with ``config`` (its context
    limit) and ``tokenizer``; refuses empty data, inputs longer than the context (unless ``cfg.truncate``) and
    user data too small for every split."""
    rule = _check_settings(cfg, task)
    everything = task.examples(cfg.seed)
    examples = everything[: cfg.max_examples]
    if not examples:
        raise ExtractError(f"task {task.name!r} has no examples: check the data file")
    tokens = Tokens(tokenizer, examples)
    if tokens.lengths.min() == 0:
        raise ExtractError(f"example {int(np.argmin(tokens.lengths))} of task {task.name!r} is empty: fix the data")
    examples = fit_context(task, examples, tokens, context_limit(config), cfg.truncate,
                           prepends_special_tokens(tokenizer))
    if task.token_labeler is not None:  # labels that depend on the tokenization
        examples = [replace(ex, token_labels=task.token_labeler(tokens[i].tolist(), tokenizer))
                    for i, ex in enumerate(examples)]
    rows_per = np.array([len(_positions(ex, int(n), rule)) for ex, n in zip(examples, tokens.lengths)])
    keys = [ex.group or str(i) for i, ex in enumerate(examples)]  # an example without a group is its own group
    splits = assign_splits(keys, task.split_fractions, cfg.seed)
    kept = f" (--max_examples {cfg.max_examples} keeps {len(examples)} of {len(everything)})" \
        if len(examples) < len(everything) else ""
    if "share" not in task.extra:  # a torchrun rank's share: the whole task was checked (extract.distributed)
        require_every_split(task, keys, splits, kept)
    group_ids = {g: i for i, g in enumerate(sorted(set(keys)))}
    return Plan(rule, examples, tokens, rows_per, np.concatenate([[0], np.cumsum(rows_per)]), splits,
                np.array([group_ids[k] for k in keys], dtype=np.int64))


def preflight(config, tokenizer, task: Task, out: str | Path, cfg: ExtractConfig, resume: bool = False) -> Plan:
    """Everything :func:`extract` would refuse, checked from the model's config and tokenizer before its weights
    load: the settings, ``--layers``, the inputs (see :func:`plan_extraction`) and the free space for the store.
    Returns the plan, for :func:`extract` to reuse."""
    layout = config_layout(config)
    layers = _layers(cfg, layout.n_layers) if layout is not None else None
    plan = plan_extraction(task, tokenizer, config, cfg)
    if layout is not None and not (resume and Path(out).exists()):  # a finished store needs no space
        check_free_space(out, _store_size(plan, layout, layers, cfg), resume)
    return plan


def _meta(loaded: LoadedModel, task: Task, cfg: ExtractConfig, plan: Plan, layout: HeadLayout,
          layers: list[int]) -> StoreMeta:
    model = loaded.model
    settings = {k: v for k, v in asdict(cfg).items() if k != "max_examples" and (k != "truncate" or v)}
    settings.update(layers=layers, positions=plan.rule, model_dtype=str(next(model.parameters()).dtype),
                    n_examples=len(plan.examples))
    return StoreMeta(
        model_id=loaded.model_id, weights_hash=loaded.weights_hash, architecture=model.config.model_type,
        hook_point=hook_point(model), n_layers=layout.n_layers, layers=layers, n_heads=layout.n_heads,
        n_kv_heads=layout.n_kv_heads, d_head=layout.d_head, d_model=layout.d_model,
        dtype=np.dtype(STORE_DTYPES[cfg.store_dtype]).name, position_rule=plan.rule, padding_side=cfg.padding_side,
        bos=prepends_special_tokens(loaded.tokenizer), task=task.name, stage=task.stage,
        label_names=list(task.label_names), label_kind=task.label_kind, dataset_hash=dataset_hash(plan.examples),
        n_examples=len(plan.examples), n_rows=plan.n_rows, has_writes=cfg.writes, headprobe_version=_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), config=settings)


def _finished(out: Path, meta: StoreMeta, resume: bool, overwrite: bool) -> bool:
    """Whether ``out`` is a finished store to return as it is (a resume of a finished run with the same settings)."""
    if not out.exists() or overwrite or (resume and partial_path(out).exists() and progress_path(out).exists()):
        return False
    with Store(out) as done:
        why = done.meta.mismatch(meta)
    if why:
        raise ExtractError(f"{out} was made with another model, task or configuration ({why}): pass "
                           f"--overwrite to replace it, or choose another --out")
    progress_path(out).unlink(missing_ok=True)
    return True


def extract(loaded: LoadedModel, task: Task, out: str | Path, config: ExtractConfig | None = None, *,
            resume: bool = False, overwrite: bool = False, progress: bool = True, plan: Plan | None = None) -> Path:
    """Extract ``task`` with ``loaded`` into the HDF5 store ``out``; returns the finished path.

    With ``resume`` an interrupted run (``<out>.partial``) continues where its last committed block ended, and a
    finished ``out`` is returned as it is; either is refused if it was made with other settings. ``plan``: the
    result of :func:`preflight` for the same task, settings and tokenizer (saves tokenising twice).
    """
    cfg = config or ExtractConfig()
    out = Path(out)
    check_output(out, resume, overwrite)
    _check_settings(cfg, task)
    layout = head_layout(loaded.model)
    layers = _layers(cfg, layout.n_layers)
    plan = plan or plan_extraction(task, loaded.tokenizer, loaded.model.config, cfg)
    meta = _meta(loaded, task, cfg, plan, layout, layers)
    if _finished(out, meta, resume, overwrite):
        return out
    check_free_space(out, _store_size(plan, layout, layers, cfg), resume and not overwrite)
    return _write(_Run(loaded, task, cfg, plan, layout, layers), out, meta, resume and not overwrite, progress)


@dataclass
class _Run:
    """One extraction's fixed inputs, shared by the block and batch steps."""

    loaded: LoadedModel
    task: Task
    cfg: ExtractConfig
    plan: Plan
    layout: HeadLayout
    layers: list[int]

    def __post_init__(self) -> None:
        model = self.loaded.model
        self.store_dtype = np.dtype(STORE_DTYPES[self.cfg.store_dtype])
        self.label_dtype = np.int64 if self.task.label_kind in ("class", "none") else np.float32
        self.device = next(model.parameters()).device
        self.params = inspect.signature(model.base_model.forward).parameters
        self.static = {"use_cache": False} if "use_cache" in self.params else {}
        tok = self.loaded.tokenizer
        self.pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
        self.w_o = self.constants = None
        if self.cfg.writes:
            self.w_o, b_o = (t.float() for t in output_weights(model, self.layers))  # (L, H, D, d_model), (L, d_model)
            self.constants = {"out_bias": b_o.cpu().numpy().astype(self.store_dtype)}


def _write(run: _Run, out: Path, meta: StoreMeta, resume: bool, progress: bool) -> Path:
    """Run the model block by block and write the store; an existing ``out`` is only replaced (atomically) when the
    new file is complete."""
    cfg, n = run.cfg, len(run.plan.examples)
    writer = StoreWriter(out, meta, run.label_dtype, resume=resume, constants=run.constants)
    # z goes straight into the store dtype unless head writes need it in fp32 first
    capture_dtype = torch.float32 if cfg.writes or run.store_dtype == np.float32 else torch.float16
    bar = tqdm(total=n, initial=writer.examples_done, unit="ex", desc=f"extract {run.task.name}",
               disable=not progress, dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    try:
        with HeadCapture(run.loaded.model, run.layers, out_dtype=capture_dtype) as cap, torch.inference_mode():
            for start in range(writer.examples_done, n, cfg.block_examples):
                stop = min(start + cfg.block_examples, n)
                block, seen = _block(run, cap, start, stop)
                writer.write_block(stop - start, block)
                tokens_seen += seen
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


def _block(run: _Run, cap: HeadCapture, start: int, stop: int) -> tuple[dict[str, np.ndarray], int]:
    """The store rows of examples ``start..stop`` (every dataset's slice), and the tokens run through the model."""
    plan, layout, n_layers = run.plan, run.layout, len(run.layers)
    base = plan.row_offsets[start]
    n_rows = int(plan.row_offsets[stop] - base)
    block = {"z": np.empty((n_rows, n_layers, layout.n_heads, layout.d_head), run.store_dtype),
             "token_id": np.empty(n_rows, np.int32), "position": np.empty(n_rows, np.int32),
             "label": np.empty(n_rows, run.label_dtype)}
    if run.cfg.writes:
        block["write"] = np.empty((n_rows, n_layers, layout.n_heads, layout.d_model), run.store_dtype)
    seen = 0
    for batch in _batches(plan.tokens.lengths[start:stop].tolist(), run.cfg.batch_tokens):
        seen += _batch(run, cap, block, base, [start + j for j in batch])
    ex_ids = np.repeat(np.arange(start, stop), plan.rows_per[start:stop])
    block.update(example_id=ex_ids, group=plan.groups[ex_ids], split=plan.splits[ex_ids])
    return block, seen


def _batch(run: _Run, cap: HeadCapture, block: dict[str, np.ndarray], base: int, idx: list[int]) -> int:
    """Run one padded batch of the examples ``idx`` and fill their rows of ``block``; returns its real tokens."""
    plan, task = run.plan, run.task
    ids, mask, shifts = _pad(plan.tokens, idx, run.pad_id, run.cfg.padding_side)
    b_index, p_index, dest = [], [], []
    for b, i in enumerate(idx):
        pos = _positions(plan.examples[i], int(plan.tokens.lengths[i]), plan.rule)
        rows = np.arange(plan.row_offsets[i], plan.row_offsets[i + 1]) - base
        b_index += [b] * len(pos)
        p_index += [p + int(shifts[b]) for p in pos]
        dest.append(rows)
        block["position"][rows] = pos
        block["token_id"][rows] = plan.tokens[i][pos]
        block["label"][rows] = _row_labels(plan.examples[i], pos, task.label_kind)
    if not b_index:  # no row wanted from these examples: nothing to run
        return 0
    cap.select(torch.tensor(b_index, dtype=torch.long, device=run.device),
               torch.tensor(p_index, dtype=torch.long, device=run.device))
    kwargs = {"input_ids": torch.from_numpy(ids).to(run.device),
              "attention_mask": torch.from_numpy(mask).to(run.device)}
    if "position_ids" in run.params:
        kwargs["position_ids"] = torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)).to(run.device)
    try:
        run.loaded.model.base_model(**kwargs, **run.static)
    except StopForward:
        pass
    dest = np.concatenate(dest)
    to_store = STORE_TORCH[run.store_dtype.name]
    block["z"][dest] = _finite(cap.z.to(to_store), task, idx)
    if run.cfg.writes:
        block["write"][dest] = _finite(torch.einsum("rlhd,lhdm->rlhm", cap.z, run.w_o).to(to_store), task, idx)
    return int(mask.sum())


def _finite(x: torch.Tensor, task: Task, idx: list[int]) -> np.ndarray:
    if not torch.isfinite(x).all():
        raise ExtractError(f"non-finite activations in examples {min(idx)}..{max(idx)} of task {task.name!r}: "
                           f"extract with --store_dtype fp32 or a wider --dtype")
    return x.cpu().numpy()
