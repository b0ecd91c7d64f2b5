"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~20x faster on one thread when the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """A tiny random model of ``family``: gpt2, gpt_neox, llama (GQA), qwen2 (GQA, o_proj without bias) or bert."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=300, attn_implementation=attn)
    if family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common))
    elif family == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=128, **common))
    elif family == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                         **common))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                         **common))
    elif family == "bert":
        m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=128, **common))
    else:
        raise ValueError(family)
    # random init has tiny weights; scale them so activations are not ~0
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return m.eval()


FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "bert"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def tiny_loaded(family: str, bos: int | None = 1):
    from extract.models import LoadedModel, weights_fingerprint

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
