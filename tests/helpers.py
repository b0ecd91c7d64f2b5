"""Shared builders for the tests: tiny random models of every family, tokenizers, stores, checkpoints and
subprocess runners. Test modules import from here, never from each other."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

# resolved here (transformers imports lazily) so that forked CLI subprocesses start with them loaded
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401

from headprobe.extract.store import StoreMeta, write_array_store
from headprobe.extract.tasks import Example, Task
from headprobe.probes.checkpoint import CheckpointConfig, PretrainedMixin, register
from headprobe.probes.hub import FromPretrained

ROOT = Path(__file__).resolve().parents[1]

class ByteTokenizer:
    """A minimal tokenizer for tiny models: one token per byte (+ offset), optional BOS."""

    def __init__(self, bos_token_id: int | None = None, vocab_size: int = 300):
        self.bos_token_id, self.vocab_size, self.pad_token_id = bos_token_id, vocab_size, 0

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [3 + (b % (self.vocab_size - 3)) for b in text.encode()]
        return ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids

    def __call__(self, texts, add_special_tokens: bool = True):
        if isinstance(texts, str):
            return {"input_ids": self._encode(texts, add_special_tokens)}
        return {"input_ids": [self._encode(t, add_special_tokens) for t in texts]}


def tiny_model(family: str, seed: int = 0, attn: str = "eager"):
    """A tiny random model of ``family``: gpt2, gpt_neox, llama (GQA), qwen2 (GQA, o_proj without bias) or bert.
    The rotary families have a 512-token context (the longest built-in input, a corpus document, fits); gpt2 and
    bert, with learned positions, 128."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=300, attn_implementation=attn)
    if family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common))
    elif family == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=512, **common))
    elif family == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                                         **common))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                                         **common))
    elif family == "bert":
        m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=128, **common))
    else:
        m = _more_families(family, common)
    # random init has tiny weights; scale them so activations are not ~0
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return m.eval()


def _more_families(family: str, common: dict):
    """Tiny random gemma2, phi3 (fused QKV), roberta and distilbert models."""
    from transformers import (DistilBertConfig, DistilBertModel, Gemma2Config, Gemma2ForCausalLM, Phi3Config,
                              Phi3ForCausalLM, RobertaConfig, RobertaModel)

    decoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=512, **common)
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(head_dim=8, sliding_window=64, **decoder))
    if family == "phi3":
        return Phi3ForCausalLM(Phi3Config(pad_token_id=0, **decoder))
    if family == "roberta":
        return RobertaModel(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=130, pad_token_id=0,
                                          **common))
    if family == "distilbert":
        return DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=128, pad_token_id=0, **common))
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "bert"]
RUN_FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "phi3", "bert", "roberta", "distilbert"]


def tiny_loaded(family: str, bos: int | None = 1):
    from headprobe.extract.models import LoadedModel, weights_fingerprint

    model = tiny_model(family)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(bos), model_id=f"tiny-{family}",
                       weights_hash=weights_fingerprint(model))


def save_tiny_llama(folder: Path) -> Path:
    """A tiny random Llama and a byte-level tokenizer (BOS added) saved as a folder load_model reads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def interrupted(loaded, task, out, cfg, at_forward: int = 2) -> None:
    """Run an extraction that a KeyboardInterrupt stops at its ``at_forward``-th forward (leaves ``out``.partial)."""
    from headprobe.extract import extract

    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == at_forward:
            raise KeyboardInterrupt
    handle = loaded.model.base_model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(loaded, task, out, cfg, progress=False)
    finally:
        handle.remove()


def byte_tokenizer(bos: bool = True):
    """A real (saveable) Hugging Face byte-level tokenizer: 3 special tokens + 256 bytes, optional BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_model_folder(path, family: str = "llama", v_scale: float = 1.0) -> str:
    """A tiny random model of ``family`` plus a byte tokenizer, saved as a local model folder.

    ``v_scale`` multiplies the value projections (a large one makes z overflow float16).
    """
    from helpers import tiny_model

    model = tiny_model(family)
    if v_scale != 1.0:
        with torch.no_grad():
            for layer in model.base_model.layers:
                layer.self_attn.v_proj.weight.mul_(v_scale)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _cli_child(argv: list[str], log: str, env: dict[str, str], err_log: str | None = None) -> None:
    """Body of a CLI subprocess: ``headprobe <argv>`` with stdout (and stderr, unless ``err_log``) going to ``log``."""
    import os
    import sys

    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(os.open(err_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if err_log else fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from headprobe.train.cli import main

    try:
        main(argv)
    except SystemExit as done:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(done.code if isinstance(done.code, int) else 1)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


_SERVER = None


def cli_process(argv: list[str], log, env: dict[str, str] | None = None, err_log=None):
    """Start ``headprobe <argv>`` as a subprocess forked from a server that has imported torch and transformers
    once (a fresh interpreter per run would spend ~5-10 s importing). Returns the started Process."""
    import multiprocessing

    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(["headprobe.extract.cli", "headprobe.train.cli", "headprobe.train.train_cli",
                                        "headprobe.train.run_cli", "headprobe.probes.attribution.cli",
                                        "headprobe.probes.hub.cli", "headprobe.probes.linear", "helpers"])
    proc = _SERVER.Process(target=_cli_child, args=(list(argv), str(log), env or {}, err_log and str(err_log)))
    proc.start()
    return proc


def run_cli(argv: list[str], log, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run ``headprobe <argv>`` in a subprocess (see :func:`cli_process`); return (exit code, output)."""
    from pathlib import Path

    proc = cli_process(argv, log, env)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        raise TimeoutError(f"headprobe {' '.join(argv)} did not finish in {timeout} s")
    return proc.exitcode, Path(log).read_text()


def run_cli_split(argv: list[str], log, env: dict[str, str] | None = None,
                  timeout: float = 120) -> tuple[int, str, str]:
    """Like :func:`run_cli`, with stderr apart: (exit code, stdout, stderr)."""
    err_log = Path(str(log) + ".err")
    proc = cli_process(argv, log, env, err_log)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        raise TimeoutError(f"headprobe {' '.join(argv)} did not finish in {timeout} s")
    return proc.exitcode, Path(log).read_text(), err_log.read_text()


@register
class HeadScorer(PretrainedMixin, FromPretrained, torch.nn.Module):
    """A per-head linear read-out, (B, L, H, D) -> (B, L, H): a small stand-in for a probe."""

    def __init__(self, n_layers: int, n_heads: int, d_head: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_layers, n_heads, d_head))
        self.bias = torch.nn.Parameter(torch.randn(n_layers, n_heads))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blhd,lhd->blh", z, self.weight) + self.bias


def store_meta(**overrides) -> StoreMeta:
    meta = StoreMeta(model_id="tiny-llama", weights_hash="abc123", architecture="llama",
                     hook_point="model.layers.{i}.self_attn.o_proj:input", n_layers=3, layers=[0, 1, 2], n_heads=6,
                     n_kv_heads=2, d_head=8, d_model=48, dtype="float16", position_rule="last", padding_side="right",
                     bos=True, task="capitals", stage="KR", label_names=["false", "true"], label_kind="class",
                     dataset_hash="d", n_examples=10, n_rows=10, has_writes=False, headprobe_version="0.1.0",
                     created="now")
    return replace(meta, **overrides)


def make_checkpoint(folder, seed: int = 0) -> HeadScorer:
    torch.manual_seed(seed)
    module = HeadScorer(3, 6, 8)
    config = CheckpointConfig.from_store(store_meta(), "HeadScorer", {"n_layers": 3, "n_heads": 6, "d_head": 8},
                                         command="python make.py", normalisation={"scale": 1.0})
    module.save_pretrained(folder, config, metrics={"val": {"accuracy": 0.75}, "per_head": [[0.5, 0.6]]})
    return module


def make_store(path, z: np.ndarray, split_every: int = 5) -> str:
    """An unlabelled all-token store holding z (N, L, H, D); every ``split_every``-th row is test."""
    split = np.where(np.arange(len(z)) % split_every == 0, 2, 0)
    return str(write_array_store(path, z, None, split, label_kind="none", position_rule="all",
                                 token_id=np.zeros(len(z), np.int32)))


def planted(n: int = 600, shape=(3, 4, 8), heads=((0, 1), (1, 2), (2, 3)), seed: int = 0):
    """Gaussian z with heads of very different scales; the label is written into the chosen heads."""
    rng = np.random.default_rng(seed)
    Ln, H, D = shape
    scale = 10.0 ** rng.uniform(-1.5, 0.5, size=(Ln, H))
    z = rng.normal(size=(n, Ln, H, D)) * scale[None, :, :, None]
    y = rng.integers(0, 2, n)
    for l, h in heads:
        z[:, l, h, 0] += (2 * y - 1) * 1.5 * scale[l, h]
    split = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
    return z, y, split


def torchrun(nproc: int, *args: str, timeout: float = 240) -> tuple[int, str, str]:
    """Run ``torchrun --standalone --nproc_per_node nproc *args`` from the repository; kill every worker on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s: {err[-2000:]}") from None
    return proc.returncode, out, err


TEXTS = ["a", "Paris is in France", "xy", "The capital of Peru is Lima", "hello world, again and again and again",
         "ok", "abcdefghijklmnopqrstuvwxyz", "mid length text"]


def make_task(position_rule: str = "last") -> Task:
    """Examples of very different lengths (so batches are padded), each naming a position."""
    def make(seed: int) -> list[Example]:
        return [Example(text=t, label=i % 2, group=f"g{i // 2}", position=-min(2, len(t)))
                for i, t in enumerate(TEXTS)]
    return Task("toy", "KR", "toy", ["no", "yes"], make, position_rule=position_rule)


class CrashAt(lightning.Callback):
    """Simulates a killed run: raises when epoch ``epoch`` starts."""

    def __init__(self, epoch: int = 2):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


# --- synthetic per-head activations with planted heads, and small reference fits (attribution tests) ---
L, H, D = 4, 4, 8
# stage -> heads its tasks' labels are written into (distinct per stage)
PLANTED = {"KR": [(0, 1)], "ICI": [(1, 2)], "LR": [(2, 0), (3, 3)], "EP": [(3, 1)]}
TASKS = {"kr_a": "KR", "kr_b": "KR", "ici": "ICI", "lr": "LR", "ep": "EP"}


@dataclass
class SyntheticTask:
    name: str
    stage: str
    z: np.ndarray  # (N, L, H, D)
    labels: np.ndarray  # (N,)
    train: np.ndarray  # row indices
    val: np.ndarray


def make_tasks(n: int = 600, amplitude: float = 2.0, flip: float = 0.15, seed: int = 0) -> list[SyntheticTask]:
    """Per-head z as a sparse code over head-local atoms (shared by all tasks) plus small noise; each task's binary
    label switches on a task-specific atom in every planted head of its stage (present for label 1), each head
    independently wrong for a ``flip`` share of rows (so heads of one stage complement each other)."""
    rng = np.random.default_rng(seed)
    unit = lambda *shape: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(rng.normal(size=(*shape, D)))
    atoms = unit(L, H, 4)  # (L, H, atoms, D), the "model's" features
    label_atoms = {name: unit(L, H) for name in TASKS}
    out = []
    for name, stage in TASKS.items():
        code = rng.random((n, L, H, 4)) < 0.15
        z = np.einsum("nlha,lhad->nlhd", code * (1 + rng.exponential(size=code.shape)), atoms)
        z += 0.2 * rng.normal(size=z.shape)
        y = rng.integers(0, 2, n)
        for layer, head in PLANTED[stage]:
            on = y ^ (rng.random(n) < flip)
            z[:, layer, head] += np.outer(on * amplitude, label_atoms[name][layer, head])
        perm = rng.permutation(n)
        out.append(SyntheticTask(name, stage, z, y, perm[: n * 2 // 3], perm[n * 2 // 3:]))
    return out


def per_head_logistic(z: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Reference recipe: one sklearn logistic regression per (layer, head); val accuracy (L, H)."""
    from sklearn.linear_model import LogisticRegression

    acc = np.zeros(z.shape[1:3])
    for layer in range(z.shape[1]):
        for head in range(z.shape[2]):
            clf = LogisticRegression(max_iter=1000).fit(z[train, layer, head], y[train])
            acc[layer, head] = clf.score(z[val, layer, head], y[val])
    return acc


def group_lasso(z: np.ndarray, y: np.ndarray, lam: float = 0.04, steps: int = 400, lr: float = 0.5) -> np.ndarray:
    """Logistic regression with one group per head, by proximal gradient (exact zeros): weights (L, H, D)."""
    x = torch.as_tensor(z, dtype=torch.float64)
    t = torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1:], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.einsum("nlhd,lhd->n", x, w) + b, t)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
            norms = w.norm(dim=-1, keepdim=True)
            w *= (1 - lr * lam / norms.clamp_min(1e-12)).clamp_min(0)
    return w.detach().numpy()


def topk_sae(x: np.ndarray, d_sae: int = 32, k: int = 4, steps: int = 300, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small TopK SAE fitted to x (N, d_in) with Adam; W_enc (d_in, F), W_dec (F, d_in), b_enc (F,), b_dec (d_in,)."""
    torch.manual_seed(seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    d_in = x.shape[1]
    W_dec = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=1))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(x.mean(0).clone())
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=1e-2)
    for _ in range(steps):
        f = topk_activations((x - b_dec) @ W_enc + b_enc, k)
        loss = ((f @ W_dec + b_dec - x) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {k_: v.detach() for k_, v in dict(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec).items()}


def topk_activations(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.relu().topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def planted_map() -> dict[tuple[int, int], str]:
    return {head: stage for stage, heads in PLANTED.items() for head in heads}


def lda_accuracy(z: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Closed-form linear probes (shrunk LDA), one per (layer, head), all at once: val accuracy (L, H)."""
    x = torch.as_tensor(z, dtype=torch.float64).flatten(1, 2).transpose(0, 1)  # (G, N, D)
    t = torch.as_tensor(y)
    xt, tt = x[:, train], t[train]
    mu1, mu0 = xt[:, tt == 1].mean(1), xt[:, tt == 0].mean(1)  # (G, D)
    centred = torch.cat([xt[:, tt == 1] - mu1[:, None], xt[:, tt == 0] - mu0[:, None]], dim=1)
    cov = centred.transpose(1, 2) @ centred / centred.shape[1] + ridge * torch.eye(x.shape[2], dtype=x.dtype)
    w = torch.linalg.solve(cov, (mu1 - mu0)[..., None])[..., 0]  # (G, D)
    b = -(w * (mu1 + mu0) / 2).sum(-1)
    pred = (torch.einsum("gnd,gd->gn", x[:, val], w) + b[:, None]) > 0
    return (pred == t[val].bool()).double().mean(1).view(z.shape[1], z.shape[2]).numpy()


# --- the regression snapshot of a `headprobe run` folder ----------------------------------------------------------
SNAPSHOT_FILES = ("attribution/stage_map.json", "attribution/ablation.json", "attribution/stage_scores.csv",
                  "attribution/head_types.csv")


def _numbers(text: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?|-?\d+e-?\d+|nan|inf", text)]


def run_snapshot(folder: Path) -> dict:
    """What a `headprobe run` found, to compare across refactors: every number of the attribution's data files and
    of the report's tables (the Run section's timings and versions left out), each task's per-head table, and the
    sha256 of every report image."""
    import hashlib
    import json

    folder = Path(folder)
    out = {"files": {}, "tables": {}, "images": {}}
    for name in SNAPSHOT_FILES:
        out["files"][name] = _numbers((folder / name).read_text())
    for heads in sorted(folder.glob("runs/linear/*/heads.csv")):
        out["files"][str(heads.relative_to(folder))] = _numbers(heads.read_text())
    report = (folder / "report" / "report.md").read_text().split("\n## Run")[0]
    for line in report.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            key = line.split("|")[1].strip()
            out["tables"].setdefault(key, []).append(_numbers(line))
    for img in sorted((folder / "report" / "img").glob("*.png")):
        out["images"][img.name] = hashlib.sha256(img.read_bytes()).hexdigest()
    json.dumps(out)  # JSON-able
    return out


def assert_same_store(path, reference) -> None:
    """Every dataset byte for byte, and every attribute but the creation time."""
    import h5py

    with h5py.File(path, "r") as a, h5py.File(reference, "r") as b:
        assert sorted(a) == sorted(b)
        for name in b:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert a[name][()].tobytes() == b[name][()].tobytes(), name
        assert {k: str(v) for k, v in a.attrs.items() if k != "created"} == \
               {k: str(v) for k, v in b.attrs.items() if k != "created"}
