"""Item 5 and 6 of the extraction issue, on a tiny random model of every family.

z must equal each head's attention pattern @ V (taken from an independent eager forward with output_attentions),
per-head writes plus the output bias must sum to the output projection's output, and the position rules, padding
sides and BOS handling must give the same rows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headprobe.extract import ExtractConfig, Store, extract
from headprobe.extract.hooks import ARCHITECTURES, HookSpec, UnsupportedArchitecture, out_projections
from headprobe.extract.tasks import Example, Task
from helpers import TEXTS, ByteTokenizer, make_task, tiny_loaded


def value_hooks(model, family: str, store: dict) -> list:
    """Forward hooks that record V (1, S, n_heads, d_head) of every layer, GQA kv heads expanded to query heads."""
    cfg = model.config
    base = model.base_model
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H

    def grab(layer: int, fn):
        def hook(module, args, out):
            store[layer] = fn(out)
        return hook

    if family == "gpt2":
        mods = [b.attn.c_attn for b in base.h]
        fn = lambda out: out[..., 2 * cfg.n_embd:].unflatten(-1, (H, D))
    elif family == "gpt_neox":
        mods = [b.attention.query_key_value for b in base.layers]
        fn = lambda out: out.unflatten(-1, (H, 3 * D))[..., 2 * D:]
    elif family in ("llama", "qwen2"):
        mods = [b.self_attn.v_proj for b in base.layers]
        rep = H // cfg.num_key_value_heads
        fn = lambda out: out.unflatten(-1, (cfg.num_key_value_heads, D)).repeat_interleave(rep, dim=-2)
    elif family == "bert":
        mods = [b.attention.self.value for b in base.encoder.layer]
        fn = lambda out: out.unflatten(-1, (H, D))
    else:
        raise ValueError(family)
    return [m.register_forward_hook(grab(i, fn)) for i, m in enumerate(mods)]


def reference(model, family: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """From one unpadded eager forward: A @ V (S, L, H, D) and the output projection's output (S, L, d_model)."""
    values, outputs = {}, {}
    handles = value_hooks(model, family, values)
    handles += [p.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
                for i, p in enumerate(out_projections(model))]
    try:
        with torch.no_grad():
            res = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    L = len(res.attentions)
    assert L == len(values) and all(a is not None for a in res.attentions), "eager attention must return patterns"
    z = torch.stack([torch.einsum("hqk,khd->qhd", res.attentions[l][0], values[l][0]) for l in range(L)], dim=1)
    out = torch.stack([outputs[l][0] for l in range(L)], dim=1)
    return z.numpy(), out.numpy()


def test_z_is_attention_pattern_times_values_and_writes_sum_to_output(tmp_path, family):
    loaded = tiny_loaded(family)
    cfg = ExtractConfig(positions="all", store_dtype="fp32", writes=True, batch_tokens=64)
    with Store(extract(loaded, make_task(), tmp_path / "z.h5", cfg, progress=False)) as s:
        z, writes = s.activations(), s.activations(name="write")
        bias = s.file["out_bias"][:]
        ex_id, pos, tok = s.column("example_id"), s.column("position"), s.column("token_id")
    assert z.dtype == np.float32 and s.meta.dtype == "float32"
    tokenizer = loaded.tokenizer
    assert len(z) == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    checked = 0
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text)["input_ids"]
        rows = np.flatnonzero(ex_id == i)
        np.testing.assert_array_equal(pos[rows], np.arange(len(ids)))
        np.testing.assert_array_equal(tok[rows], ids)
        ref_z, ref_out = reference(loaded.model, family, ids)
        scale = np.abs(ref_z).max()
        assert scale > 0.1  # not a degenerate all-zero model
        np.testing.assert_allclose(z[rows], ref_z, rtol=1e-5, atol=1e-5 * scale)
        summed = writes[rows].sum(axis=2) + bias  # (S, L, d_model)
        np.testing.assert_allclose(summed, ref_out, rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())
        checked += len(rows)
    assert checked == len(z)


def test_position_rules_and_padding_sides(tmp_path, family):
    loaded = tiny_loaded(family)
    results = {}
    for rule in ("all", "last", "task"):
        for side in ("right", "left"):
            cfg = ExtractConfig(positions=rule, padding_side=side, store_dtype="fp32", batch_tokens=96)
            with Store(extract(loaded, make_task(), tmp_path / f"{rule}-{side}.h5", cfg, progress=False)) as s:
                assert s.meta.padding_side == side and s.meta.position_rule == rule
                results[rule, side] = {k: s.column(k) for k in ("example_id", "position", "token_id", "label")}
                results[rule, side]["z"] = s.activations()
    lengths = np.array([len(loaded.tokenizer(t)["input_ids"]) for t in TEXTS])
    for rule in ("all", "last", "task"):
        right, left = results[rule, "right"], results[rule, "left"]
        for key in right:
            np.testing.assert_array_equal(right[key], left[key], err_msg=f"{rule}/{key}")
    full = results["all", "right"]
    for rule, pos in (("last", lengths - 1), ("task", lengths - np.minimum(2, [len(t) for t in TEXTS]))):
        got = results[rule, "right"]
        np.testing.assert_array_equal(got["example_id"], np.arange(len(TEXTS)))
        np.testing.assert_array_equal(got["position"], pos)
        np.testing.assert_array_equal(got["label"], np.arange(len(TEXTS)) % 2)
        # the row equals the 'all' row of the same token (the row does not depend on which positions are kept)
        match = [np.flatnonzero((full["example_id"] == i) & (full["position"] == p))[0] for i, p in enumerate(pos)]
        np.testing.assert_allclose(got["z"], full["z"][match], rtol=1e-6, atol=1e-6)


def test_token_labels_keep_only_labelled_positions_under_every_rule(tmp_path):
    """A token labeler's None leaves no row, whatever the position rule; a batch of examples without any labelled
    token runs nothing (the long "c"/"d" texts share a batch and have no labelled token)."""
    texts = ["aaaa", "bbbbbbbb", "c" * 25, "d" * 25, "ee"]
    lab = lambda ids, tok: [1 if t in (3 + ord("a"), 3 + ord("e")) else None for t in ids]  # ByteTokenizer ids
    loaded = tiny_loaded("llama")
    make = lambda seed: [Example(text=t, group=str(i)) for i, t in enumerate(texts)]
    for rule, examples in (("all", [0] * 4 + [4] * 2), ("last", [0, 4])):
        task = Task("t", "ICI", "", ["x", "y"], make, position_rule=rule, token_labeler=lab)
        cfg = ExtractConfig(batch_tokens=60)
        with Store(extract(loaded, task, tmp_path / f"{rule}.h5", cfg, progress=False)) as s:
            np.testing.assert_array_equal(s.column("example_id"), examples)
            assert (s.column("label") == 1).all()


@pytest.mark.parametrize("bos", [None, 1])
def test_bos_is_recorded_and_kept(tmp_path, bos):
    loaded = tiny_loaded("llama", bos=bos)
    cfg = ExtractConfig(positions="all", store_dtype="fp32")
    with Store(extract(loaded, make_task(), tmp_path / "b.h5", cfg, progress=False)) as s:
        assert s.meta.bos is (bos is not None)
        first = s.column("position") == 0
        tokens = s.column("token_id")[first]
        if bos is None:
            assert (tokens != 1).all() and len(s) == sum(len(t.encode()) for t in TEXTS)
        else:
            assert (tokens == bos).all() and len(s) == sum(len(t.encode()) + 1 for t in TEXTS)


def test_bos_detection_on_hugging_face_tokenizers():
    from headprobe.extract.extractor import prepends_special_tokens
    from helpers import byte_tokenizer

    with_bos, without = byte_tokenizer(bos=True), byte_tokenizer(bos=False)
    assert with_bos("ab")["input_ids"] == [1, *without("ab")["input_ids"]]
    assert prepends_special_tokens(with_bos) and not prepends_special_tokens(without)


def test_unsupported_architecture_names_families_and_registry_entry(tmp_path, monkeypatch):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                     attn_implementation="eager")).eval()
    from headprobe.extract.models import LoadedModel, weights_fingerprint

    loaded = LoadedModel(model, ByteTokenizer(1), "tiny-opt", weights_fingerprint(model))
    with pytest.raises(UnsupportedArchitecture) as err:
        extract(loaded, make_task(), tmp_path / "o.h5", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "'opt'" in msg
    for family in ("GPT-2", "GPT-NeoX", "Llama", "BERT"):
        assert family in msg
    assert "headprobe.extract.hooks.ARCHITECTURES['opt'] = HookSpec(" in msg
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.partial").exists()

    monkeypatch.setitem(ARCHITECTURES, "opt", HookSpec(layers="decoder.layers", out_proj="self_attn.out_proj"))
    cfg = ExtractConfig(positions="all", store_dtype="fp32", writes=True)
    with Store(extract(loaded, make_task(), tmp_path / "o.h5", cfg, progress=False)) as s:
        assert s.shape[1:] == (2, 4, 8) and s.meta.architecture == "opt"
        ex0 = s.column("example_id") == 1
        writes = s.activations(rows=np.flatnonzero(ex0), name="write").sum(axis=2) + s.file["out_bias"][:]
    outputs = {}
    handles = [p.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o[0]))
               for i, p in enumerate(out_projections(model))]
    with torch.no_grad():
        model(input_ids=torch.tensor([loaded.tokenizer(TEXTS[1])["input_ids"]]))
    for h in handles:
        h.remove()
    ref = torch.stack([outputs[0], outputs[1]], dim=1).numpy()
    np.testing.assert_allclose(writes, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_head_writes_refuse_offloaded_output_projections():
    """With a layer's W_O offloaded (meta weights, as accelerate leaves it), head writes cannot be computed: a
    one-line error says what to do instead of a torch error about meta tensors."""
    from headprobe.extract.hooks import output_weights

    model = tiny_loaded("llama").model
    proj = out_projections(model)[1]
    proj.weight = torch.nn.Parameter(torch.empty_like(proj.weight, device="meta"))
    assert output_weights(model, [0])[0].shape[:2] == (1, 6)  # layer 0 is in memory
    with pytest.raises(ValueError, match=r"layer 1's output projection is offloaded .* drop --writes"):
        output_weights(model, [0, 1])
