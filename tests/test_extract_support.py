"""Shared helpers for the extraction tests (this module holds no tests)."""
from __future__ import annotations

import pytest
import torch
# resolved here (transformers imports lazily) so that forked CLI subprocesses start with them loaded
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401


def interrupted(loaded, task, out, cfg, at_forward: int = 2) -> None:
    """Run an extraction that a KeyboardInterrupt stops at its ``at_forward``-th forward (leaves ``out``.partial)."""
    from extract import extract

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
    from tests.conftest import tiny_model

    model = tiny_model(family)
    if v_scale != 1.0:
        with torch.no_grad():
            for layer in model.base_model.layers:
                layer.self_attn.v_proj.weight.mul_(v_scale)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _cli_child(argv: list[str], log: str, env: dict[str, str]) -> None:
    """Body of a CLI subprocess: ``headprobe <argv>`` with stdout and stderr going to ``log``."""
    import os
    import sys

    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from train.cli import main

    try:
        main(argv)
    except SystemExit as done:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(done.code if isinstance(done.code, int) else 1)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


_SERVER = None


def cli_process(argv: list[str], log, env: dict[str, str] | None = None):
    """Start ``headprobe <argv>`` as a subprocess forked from a server that has imported torch and transformers
    once (a fresh interpreter per run would spend ~5-10 s importing). Returns the started Process."""
    import multiprocessing

    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(["extract.cli", "train.cli", "tests.test_extract_support"])
    proc = _SERVER.Process(target=_cli_child, args=(list(argv), str(log), env or {}))
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
