"""Where each architecture's per-head outputs live, and a hook that captures them.

Every supported family has an attention output projection (``W_O``) whose *input* is the concatenation of the
heads' outputs ``z`` (batch, seq, n_heads * d_head), with ``z_h = A_h @ V_h``. We hook that input. Grouped-query
models (Llama, Mistral, Qwen2, Gemma) share K/V between query heads, but ``z`` still has one block per query head,
so every query head is stored.

To support a new family, add one entry: ``ARCHITECTURES["my_type"] = HookSpec(layers="...", out_proj="...")``
where ``my_type`` is ``config.model_type``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from headprobe import HeadprobeError, InputError


@dataclass(frozen=True)
class HookSpec:
    layers: str  # path from the base model (``model.base_model``) to the ModuleList of blocks
    out_proj: str  # path from a block to the attention output projection; its input is z
    conv1d: bool = False  # weight stored (in, out), as GPT-2's Conv1D


_LLAMA_LIKE = HookSpec("layers", "self_attn.o_proj")
ARCHITECTURES: dict[str, HookSpec] = {
    "gpt2": HookSpec("h", "attn.c_proj", conv1d=True),
    "gpt_neox": HookSpec("layers", "attention.dense"),
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                                "granite", "phi3", "starcoder2")},
    "bert": HookSpec("encoder.layer", "attention.output.dense"),
    "roberta": HookSpec("encoder.layer", "attention.output.dense"),
    "xlm-roberta": HookSpec("encoder.layer", "attention.output.dense"),
    "distilbert": HookSpec("transformer.layer", "attention.out_lin"),
}
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert")  # bidirectional: no next-token prediction
FAMILIES = "GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2/Gemma-style, BERT-style encoders"


class UnsupportedArchitecture(HeadprobeError, ValueError):
    pass


@dataclass(frozen=True)
class HeadLayout:
    """Shape of a model's attention heads."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int


def spec_for(model: nn.Module) -> HookSpec:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported (supported families: {FAMILIES}); add one registry "
            f"entry: headprobe.extract.hooks.ARCHITECTURES[{model_type!r}] = HookSpec(layers='<path to blocks>', "
            f"out_proj='<path to the attention output projection in a block>')")
    return ARCHITECTURES[model_type]


def out_projections(model: nn.Module) -> list[nn.Module]:
    """The attention output projection of every layer, in order."""
    spec = spec_for(model)
    blocks = model.base_model.get_submodule(spec.layers)
    return [block.get_submodule(spec.out_proj) for block in blocks]


def head_layout(model: nn.Module) -> HeadLayout:
    cfg = model.config
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)
    n_heads = get("num_attention_heads", "n_head", "n_heads")
    d_model = get("hidden_size", "n_embd", "dim")
    d_head = get("head_dim") or d_model // n_heads
    proj = out_projections(model)
    d_in = proj[0].weight.shape[0] if spec_for(model).conv1d else proj[0].weight.shape[1]
    if d_in != n_heads * d_head:
        raise UnsupportedArchitecture(f"{cfg.model_type}: output projection takes {d_in} inputs, expected "
                                      f"n_heads * d_head = {n_heads} * {d_head}")
    return HeadLayout(len(proj), n_heads, get("num_key_value_heads") or n_heads, d_head, d_model)


def hook_point(model: nn.Module) -> str:
    spec = spec_for(model)
    return f"{model.base_model_prefix}.{spec.layers}.{{layer}}.{spec.out_proj}:input"


def output_weights(model: nn.Module, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W_O split per head, (L, H, d_head, d_model), and the projection bias, (L, d_model) (zeros if none)."""
    layout, spec, proj = head_layout(model), spec_for(model), out_projections(model)
    device = next(model.parameters()).device  # where the extractor's inputs (and z) live, also under device_map
    ws, bs = [], []
    for i in layers:
        w = proj[i].weight.detach()
        if w.is_meta:
            raise InputError(f"layer {i}'s output projection is offloaded (meta weights): head writes need every W_O "
                             f"in memory; drop --writes, or load the model without CPU offload")
        w = w if spec.conv1d else w.T  # (H*D, d_model)
        ws.append(w.reshape(layout.n_heads, layout.d_head, -1).to(device))
        b = proj[i].bias
        bs.append(b.detach().to(device) if b is not None else torch.zeros(w.shape[1], dtype=w.dtype, device=device))
    return torch.stack(ws), torch.stack(bs)


class StopForward(Exception):
    """Raised after the last hooked layer so nothing past it is computed."""


class HeadCapture:
    """Captures z at chosen rows of the batch for chosen layers.

    Before each forward, call :meth:`select` with the (batch, position) index of every row to keep. After the
    forward, ``self.z`` holds (R, L, n_heads, d_head) in ``out_dtype``. With ``stop_early`` the forward is cut
    short (``StopForward``) right after the last hooked layer's z is captured.
    """

    def __init__(self, model: nn.Module, layers: list[int], out_dtype: torch.dtype = torch.float32,
                 stop_early: bool = True):
        self.layout = head_layout(model)
        self.layers, self.out_dtype, self.stop_early = list(layers), out_dtype, stop_early
        proj = out_projections(model)
        self._handles = [proj[layer].register_forward_pre_hook(self._hook(slot, layer == max(self.layers)))
                         for slot, layer in enumerate(self.layers)]
        self.z: torch.Tensor | None = None
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, batch_index: torch.Tensor, position_index: torch.Tensor) -> None:
        self._index = (batch_index, position_index)
        n = len(batch_index)
        self.z = torch.empty(n, len(self.layers), self.layout.n_heads, self.layout.d_head, dtype=self.out_dtype,
                             device=batch_index.device)

    def _hook(self, slot: int, last: bool):
        def hook(module, args):
            x = args[0]  # (B, S, H * D); with device_map="auto" each layer may sit on its own device
            b, p = (i.to(x.device, non_blocking=True) for i in self._index)
            rows = x[b, p]  # (R, H * D)
            self.z[:, slot] = rows.view(len(rows), self.layout.n_heads, self.layout.d_head).to(self.z.device)
            if last and self.stop_early:
                raise StopForward
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> "HeadCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
