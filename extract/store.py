"""The activation store: one HDF5 file per extraction. Every later stage reads it through :class:`Store`.

Schema version 1 (docs/store.md has the full description)::

    /z           (rows, L, H, d_head)   float16 (default) or float32, chunks of (CHUNK_ROWS, L, H, d_head)
    /write       (rows, L, H, d_model)  optional: each head's write into the residual stream, z_h @ W_O[h-block]
    /out_bias    (L, d_model)           with /write: the output projection's bias (added once, not per head)
    /token_id    (rows,) int32          the token at the row's position
    /example_id  (rows,) int64          index of the example in the task
    /position    (rows,) int32          token index in the unpadded sequence (BOS included if the tokenizer adds it)
    /label       (rows,) int64|float32  class index or regression target (-1 / nan: unlabelled)
    /group       (rows,) int64          leakage group of the example; splits never share a group
    /split       (rows,) int8           0 train, 1 val, 2 test
    attrs        StoreMeta fields (lists and dicts as JSON), ``complete`` (bool)

A file is written as ``<out>.partial`` with every dataset allocated up front, so later writes touch only raw
data; progress lives in an atomically replaced sidecar ``<out>.partial.json``. Only a finished extraction is
renamed to ``<out>``, with ``complete = True``. The writer keeps no chunk cache, so a full disk fails the write
that hit it (HDF5 would otherwise report it only when the cache is flushed, or never); it then raises
:class:`DiskFullError`, and the partial keeps every committed block for ``--resume``.
"""
from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from headprobe import HeadprobeError

SCHEMA_VERSION = 1
CHUNK_ROWS = 256
SPLITS = {"train": 0, "val": 1, "test": 2}
ROW_FIELDS = {"token_id": np.int32, "example_id": np.int64, "position": np.int32, "group": np.int64, "split": np.int8}


class StoreError(HeadprobeError, RuntimeError):
    """A store that cannot be read or written as asked; the message says what to do."""


class DiskFullError(StoreError):
    """The store does not fit (or no longer fits) on its disk; the message names the folder."""


def disk_full(err: BaseException) -> bool:
    """Whether an OS or HDF5 error says the disk (or the user's quota) is full; HDF5 reports some of them only in
    the message."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    return getattr(err, "errno", None) in codes or any(f"errno = {code}," in str(err) for code in codes)


def store_bytes(n_rows: int, n_layers: int, n_heads: int, d_head: int, itemsize: int, d_model: int = 0) -> int:
    """The raw size of a store's datasets (a lower bound on the file): z, head writes when ``d_model`` is given,
    and the per-row columns."""
    row_columns = sum(np.dtype(dt).itemsize for dt in ROW_FIELDS.values()) + 8  # + the label
    return n_rows * (n_layers * n_heads * (d_head + d_model) * itemsize + row_columns)


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a file under ``path`` would take its space)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def check_free_space(out: str | Path, need: int, resume: bool = False) -> None:
    """Refuse a store of about ``need`` bytes that does not fit in the free space of ``out``'s folder (less what an
    interrupted ``<out>.partial`` already holds, with ``resume``)."""
    folder = existing_folder(Path(out).parent)
    partial = partial_path(out)
    held = partial.stat().st_blocks * 512 if resume and partial.is_file() else 0
    free = shutil.disk_usage(folder).free
    if need - held > free:
        raise DiskFullError(f"{folder}: the store needs about {_size(need - held)} and {_size(free)} is free there: "
                            f"free some space, or choose an --out on another disk, or store less (--layers, "
                            f"--max_examples)")


ROW_IDENTITY = ("weights_hash", "architecture", "task", "dataset_hash", "dtype", "position_rule", "config")


@dataclass
class StoreMeta:
    """Everything a later stage needs to know about how the activations were made."""

    model_id: str
    weights_hash: str
    architecture: str
    hook_point: str
    n_layers: int  # layers in the model
    layers: list[int]  # layers stored, in order
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    dtype: str  # storage dtype of /z: "float16" or "float32"
    position_rule: str  # "last", "all" or "task"
    padding_side: str
    bos: bool  # whether the tokenizer prepends BOS
    task: str
    stage: str  # KR, ICI, LR, EP, or "" for unlabelled text
    label_names: list[str]
    label_kind: str  # "class", "regression" or "none"
    dataset_hash: str
    n_examples: int
    n_rows: int
    has_writes: bool
    headprobe_version: str
    created: str
    config: dict = field(default_factory=dict)  # the extraction's settings, for resume checks
    schema_version: int = SCHEMA_VERSION

    def identity(self) -> dict:
        """The settings that decide the stored rows (same identity: same rows)."""
        return {name: getattr(self, name) for name in ROW_IDENTITY}

    def mismatch(self, other: "StoreMeta | dict") -> str | None:
        """The first setting that differs from ``other`` (or its :meth:`identity`) in a way that changes the
        stored rows, or None."""
        theirs = other if isinstance(other, dict) else other.identity()
        for name, a in self.identity().items():
            if name in theirs and a != theirs[name]:
                return f"{name} {a!r} != {theirs[name]!r}"
        return None

    def to_attrs(self) -> dict:
        return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs) -> "StoreMeta":
        values = {}
        for f in fields(cls):
            if f.name not in attrs:
                raise StoreError(f"store attribute {f.name!r} is missing: the file was not written by this version")
            v = attrs[f.name]
            v = v.item() if isinstance(v, np.generic) else v
            values[f.name] = json.loads(v) if f.type in ("list[int]", "list[str]", "dict") else v
        return cls(**values)


class StoreWriter:
    """Creates or reopens ``<out>.partial`` and writes rows in order; :meth:`finish` publishes ``<out>``."""

    def __init__(self, out: Path, meta: StoreMeta, label_dtype: type, resume: bool,
                 constants: dict[str, np.ndarray] | None = None):
        self.out, self.partial = Path(out), partial_path(out)
        self.progress_path = progress_path(out)
        self.meta = meta
        if resume and self.partial.exists() and self.progress_path.exists():
            self._reopen()
            return
        self.partial.unlink(missing_ok=True)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.rows_done = self.examples_done = 0
        self.file = None
        try:
            self.file = h5py.File(self.partial, "w", track_order=True, rdcc_nbytes=0)
            self._create(label_dtype, constants or {})
        except (OSError, RuntimeError) as err:
            if not disk_full(err):
                raise
            self._abandon()
            raise DiskFullError(f"{self.partial.parent}: no space left on the device for {self.partial.name}: free "
                                f"some space, then run the command again") from None

    def _create(self, label_dtype: type, constants: dict[str, np.ndarray]) -> None:
        meta = self.meta
        n, L, H = meta.n_rows, len(meta.layers), meta.n_heads
        self._allocate("z", (n, L, H, meta.d_head), np.dtype(meta.dtype))
        if meta.has_writes:
            self._allocate("write", (n, L, H, meta.d_model), np.dtype(meta.dtype))
        for name, dt in {**ROW_FIELDS, "label": label_dtype}.items():
            self._allocate(name, (n,), np.dtype(dt))
        for name, value in constants.items():  # written before the first commit: no later metadata change
            self.file.create_dataset(name, data=value, track_times=False)
        self.file.attrs.update(meta.to_attrs())
        self.file.attrs["complete"] = False
        self._commit()

    def _abandon(self) -> None:
        """Drop a partial whose creation ran out of space. HDF5 cannot flush it, so closing fails; its complaints
        while the handles are freed are silenced (they would print tracebacks)."""
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            self.close()
            self.file = None
            gc.collect()
        finally:
            sys.unraisablehook = hook
        self.partial.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)

    def _full(self) -> DiskFullError:
        return DiskFullError(f"{self.partial.parent}: no space left on the device while writing {self.partial.name} "
                             f"({self.rows_done} of {self.meta.n_rows} rows kept): free some space, then run the same "
                             f"command with --resume to finish it")

    def _reopen(self) -> None:
        try:
            self.file = h5py.File(self.partial, "r+", rdcc_nbytes=0)
            old = StoreMeta.from_attrs(self.file.attrs)
        except (OSError, StoreError) as err:
            raise StoreError(f"{self.partial} cannot be resumed ({err}): rerun with --overwrite") from None
        why = old.mismatch(self.meta)
        if why:
            self.file.close()
            raise StoreError(f"{self.partial} was started with another model, task or configuration ({why}): "
                             f"rerun with the original settings, or with --overwrite to start again")
        self.meta = old  # keep the original creation time
        progress = json.loads(self.progress_path.read_text())
        self.rows_done, self.examples_done = progress["rows_done"], progress["examples_done"]

    def _allocate(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        """A chunked dataset whose chunks are all allocated now (no metadata changes on later writes)."""
        chunks = (min(CHUNK_ROWS, max(shape[0], 1)), *shape[1:])
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk(chunks)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)
        space = h5py.h5s.create_simple(shape)
        h5py.h5d.create(self.file.id, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)

    def write_block(self, n_examples: int, arrays: dict[str, np.ndarray]) -> None:
        """Append the rows of the next ``n_examples`` examples and commit them. On a full disk the rows since the
        last commit are lost (a resume writes them again) and :class:`DiskFullError` says what to do."""
        n = len(arrays["z"])
        try:
            for name, value in arrays.items():
                self.file[name][self.rows_done:self.rows_done + n] = value
            self._commit(self.rows_done + n, self.examples_done + n_examples)
        except (OSError, RuntimeError) as err:
            if not disk_full(err):
                raise
            raise self._full() from None
        self.rows_done += n
        self.examples_done += n_examples

    def _commit(self, rows_done: int | None = None, examples_done: int | None = None) -> None:
        """Flush the file, then record the progress atomically (the old record stays if that fails)."""
        self.file.flush()
        tmp = self.progress_path.with_suffix(".tmp")
        progress = {"rows_done": self.rows_done if rows_done is None else rows_done,
                    "examples_done": self.examples_done if examples_done is None else examples_done}
        try:
            tmp.write_text(json.dumps(progress))
            os.replace(tmp, self.progress_path)
        finally:
            tmp.unlink(missing_ok=True)

    def finish(self) -> Path:
        if self.rows_done != self.meta.n_rows:
            raise StoreError(f"internal error: wrote {self.rows_done} of {self.meta.n_rows} rows")
        try:
            self.file.attrs["complete"] = True
            self.file.close()
        except (OSError, RuntimeError) as err:
            if not disk_full(err):
                raise
            raise self._full() from None
        os.replace(self.partial, self.out)
        self.progress_path.unlink(missing_ok=True)
        return self.out

    def close(self) -> None:
        """Close the file; after a full disk a close that cannot flush is given up (the partial keeps what was
        committed)."""
        if self.file is not None and self.file.id.valid:
            try:
                self.file.close()
            except (OSError, RuntimeError) as err:
                if not disk_full(err):
                    raise

    def discard(self) -> None:
        """Close and delete the unfinished file (after an error that a resume would only repeat)."""
        self.close()
        self.partial.unlink(missing_ok=True)
        self.progress_path.unlink(missing_ok=True)


def write_array_store(path: str | Path, z: np.ndarray, labels: np.ndarray | None, split: np.ndarray, *,
                      label_names: tuple[str, ...] = ("no", "yes"), label_kind: str = "class",
                      position_rule: str = "last", token_id: np.ndarray | None = None, dtype: str = "float32") -> Path:
    """A finished store from arrays, for synthetic data and activations extracted elsewhere.

    z (N, L, H, D); ``labels`` (N,) (None with ``label_kind="none"``) and ``split`` (N,) (0 train, 1 val, 2 test)
    per row; one example per row (its own group); ``token_id`` is a row's word type for control tasks (default:
    row % 7).
    """
    N, Ln, H, D = z.shape
    unlabelled = label_kind == "none"
    meta = StoreMeta(model_id="synthetic", weights_hash="0" * 16, architecture="llama", hook_point="o_proj:input",
                     n_layers=Ln, layers=list(range(Ln)), n_heads=H, n_kv_heads=H, d_head=D, d_model=H * D,
                     dtype=dtype, position_rule=position_rule, padding_side="right", bos=True, task="synthetic",
                     stage="" if unlabelled else "KR", label_names=[] if unlabelled else list(label_names),
                     label_kind=label_kind, dataset_hash="x", n_examples=N, n_rows=N, has_writes=False,
                     headprobe_version="test", created="now")
    writer = StoreWriter(Path(path), meta, np.float32 if label_kind == "regression" else np.int64, resume=False)
    rows = np.arange(N)
    writer.write_block(N, {"z": z.astype(dtype), "label": -np.ones(N, np.int64) if labels is None else labels,
                           "split": split.astype(np.int8), "group": rows, "example_id": rows,
                           "position": np.zeros(N, np.int32), "token_id": rows % 7 if token_id is None else token_id})
    return writer.finish()


def partial_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial")


def progress_path(out: str | Path) -> Path:
    return Path(str(out) + ".partial.json")


class Store:
    """Read-only access to a finished extraction.

    >>> store = Store("capitals.h5")
    >>> store.shape                       # (rows, layers, heads, d_head)
    >>> x = store.activations(rows=store.rows("train"))   # float32 (R, L, H, D)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            partial = Path(str(self.path) + ".partial")
            hint = f" ({partial} is an unfinished extraction: rerun it with --resume)" if partial.exists() else ""
            raise StoreError(f"{self.path} does not exist{hint}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            raise StoreError(f"{self.path} is not a readable HDF5 file ({err}); extract it again") from None
        attrs = self.file.attrs
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {attrs.get('schema_version')}, this headprobe reads "
                             f"{SCHEMA_VERSION}: extract it again with this version")
        if not bool(attrs.get("complete", False)):
            raise StoreError(f"{self.path} is incomplete (the extraction was interrupted): rerun it with --resume")
        self.meta = StoreMeta.from_attrs(attrs)
        self._check_datasets()
        self._check_shards()
        self._z = self.file["z"]

    def _check_datasets(self) -> None:
        m = self.meta
        n, L = m.n_rows, len(m.layers)
        expected = {"z": (n, L, m.n_heads, m.d_head), **{k: (n,) for k in (*ROW_FIELDS, "label")}}
        if m.has_writes:
            expected.update(write=(n, L, m.n_heads, m.d_model), out_bias=(L, m.d_model))
        for name, shape in expected.items():
            got = self.file[name].shape if name in self.file else None
            if got != shape:
                raise StoreError(f"{self.path} is damaged: dataset /{name} has shape {got}, the metadata says "
                                 f"{shape}; extract it again")

    def _check_shards(self) -> None:
        """A store joined from torchrun shards reads its rows from sibling files: refuse one with a shard missing
        (HDF5 would silently return the fill value for the missing rows)."""
        missing = sorted({src.file_name for name in self.file if self.file[name].is_virtual
                          for src in self.file[name].virtual_sources()
                          if not (self.path.parent / src.file_name).is_file()})
        if missing:
            raise StoreError(f"{self.path} is joined from shards and {', '.join(missing)} is missing next to it: "
                             f"copy the shard files into {self.path.parent} (or extract again)")

    # --- small per-row arrays, read whole -------------------------------------------------------------
    def __len__(self) -> int:
        return self._z.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self._z.shape)

    def column(self, name: str) -> np.ndarray:
        """A per-row array: token_id, example_id, position, label, group or split."""
        return self.file[name][:]

    @property
    def labels(self) -> np.ndarray:
        return self.column("label")

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row indices of one split ("train", "val", "test"), or all rows."""
        if split is None:
            return np.arange(len(self))
        return np.flatnonzero(self.column("split") == SPLITS[split])

    # --- activations ------------------------------------------------------------------------------------
    def activations(self, rows: np.ndarray | slice | None = None, layers: list[int] | None = None,
                    heads: list[int] | None = None, dtype=np.float32, name: str = "z") -> np.ndarray:
        """(R, L', H', D) activations of the given rows (in the given order), layer slots and heads.

        ``layers`` are indices into ``meta.layers`` (storage slots). Scattered rows are read as a few contiguous
        slabs and picked in memory (see :meth:`_gather`), ~20x faster than HDF5 point selection.
        """
        if name not in self.file:
            raise StoreError(f"{self.path} holds no /{name} dataset" + (": extract with --writes to store the heads' "
                             "residual-stream writes" if name == "write" else ""))
        ds = self.file[name]
        for what, picked, n in (("layer slot", layers, ds.shape[1]), ("head", heads, ds.shape[2])):
            bad = [i for i in picked or [] if not -n <= i < n]
            if bad:
                raise StoreError(f"{what}s {bad} are outside 0..{n - 1} of {self.path} (layer slots index "
                                 f"meta.layers {list(self.meta.layers)})")
        if rows is None or isinstance(rows, slice):
            out = ds[rows if rows is not None else slice(None)]
        else:
            out = self._gather(ds, np.asarray(rows, dtype=np.int64))
        if layers is not None:
            out = out[:, layers]
        if heads is not None:
            out = out[:, :, heads]
        return out.astype(dtype, copy=False)

    @staticmethod
    def _gather(ds: h5py.Dataset, rows: np.ndarray, call_bytes: int = 1 << 19) -> np.ndarray:
        """Rows in the order asked, read as few contiguous slabs.

        Sorted rows closer than ``call_bytes / row_bytes`` apart share one slab: reading the rows between them
        costs less than another HDF5 call (~0.7 ms each, the price of point selection). A slab spans at most
        8 chunks, so memory stays bounded.
        """
        if rows.size == 0:
            return np.empty((0, *ds.shape[1:]), ds.dtype)
        if rows.min() < 0 or rows.max() >= ds.shape[0]:
            raise StoreError(f"row indices must lie in 0..{ds.shape[0] - 1}")
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
        max_gap = max(1, call_bytes // row_bytes)
        max_rows = 8 * (ds.chunks[0] if ds.chunks else CHUNK_ROWS)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        out = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
        breaks = np.flatnonzero(np.diff(srt) > max_gap) + 1
        for run in np.split(np.arange(len(srt)), breaks):
            s = 0
            while s < len(run):  # cut long runs so one slab holds at most max_rows rows
                lo = srt[run[s]]
                e = s + int(np.searchsorted(srt[run[s:]], lo + max_rows))
                hi = srt[run[e - 1]] + 1
                slab = ds[lo:hi]
                out[order[run[s:e]]] = slab[srt[run[s:e]] - lo]
                s = e
        return out

    def iter_blocks(self, block_rows: int = 16 * CHUNK_ROWS, rows: np.ndarray | None = None,
                    dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row indices, activations) blocks in row order; memory stays at one block."""
        rows = np.arange(len(self)) if rows is None else np.sort(np.asarray(rows))
        for i in range(0, len(rows), block_rows):
            idx = rows[i:i + block_rows]
            yield idx, self.activations(idx, dtype=dtype)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
