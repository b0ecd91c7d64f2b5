"""The checkpoint format: round trip, verification, compatibility checks and clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from headprobe.probes.checkpoint import (CLASSES, CheckpointError, file_hashes, load_local, read_checkpoint, register,
                                         save_checkpoint, sha256)
from headprobe.probes.hub import FromPretrained
from helpers import HeadScorer, make_checkpoint, store_meta


def test_round_trip_restores_module_and_provenance(tmp_path):
    module = make_checkpoint(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["README.md", "config.json", "metrics.json",
                                                                   "model.safetensors"]
    loaded = load_local(tmp_path / "ck")
    z = torch.randn(5, 3, 6, 8)
    assert torch.equal(loaded(z), module(z))
    cfg = loaded.checkpoint_config_loaded
    assert (cfg.model_id, cfg.task, cfg.stage, cfg.layers, cfg.label_names) == ("tiny-llama", "capitals", "KR",
                                                                               [0, 1, 2], ["false", "true"])
    assert cfg.data["dataset_hash"] == "d" and cfg.data["n_rows"] == 10
    assert cfg.tensors_sha256 == sha256(tmp_path / "ck" / "model.safetensors")
    assert loaded.checkpoint_metrics_loaded["val"]["accuracy"] == 0.75
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "python make.py" in card and "val/accuracy" in card
    assert set(file_hashes(tmp_path / "ck")) == {"model.safetensors", "config.json", "metrics.json", "README.md"}


def test_fp16_checkpoint_loads_into_fp32_module(tmp_path):
    module = make_checkpoint(tmp_path / "ck")
    config, tensors, _ = read_checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "half", dict(module.state_dict()), config, dtype=torch.float16)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "ck" / "model.safetensors").stat().st_size
    loaded = load_local(tmp_path / "half")
    assert loaded.weight.dtype == torch.float32
    assert torch.equal(loaded.weight, module.weight.detach().half().float())


def test_tampered_tensors_are_refused(tmp_path):
    make_checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one byte of tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load_local(tmp_path / "ck")


def test_truncated_or_foreign_tensor_files_are_refused(tmp_path):
    make_checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_local(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "tensors_sha256": ""}))
    with pytest.raises(CheckpointError, match="records no tensors_sha256"):  # nothing to verify against
        load_local(tmp_path / "ck")
    # with a matching recorded hash, safetensors itself must reject the truncated file and a pickle in its place
    for write in (lambda: path.write_bytes(whole[: len(whole) // 2]),
                  lambda: torch.save({"weight": torch.zeros(3)}, path)):  # a pickle archive: never unpickled
        write()
        (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "tensors_sha256": sha256(path)}))
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_local(tmp_path / "ck")


def test_expected_hashes_cover_every_file(tmp_path):
    make_checkpoint(tmp_path / "ck")
    hashes = file_hashes(tmp_path / "ck")
    (tmp_path / "ck" / "metrics.json").write_text('{"val": {"accuracy": 0.99}}\n')
    read_checkpoint(tmp_path / "ck")  # no expectation: metrics are not covered by config.json
    with pytest.raises(CheckpointError, match="metrics.json does not match"):
        read_checkpoint(tmp_path / "ck", hashes)


def test_unknown_class_and_bad_config_are_clear(tmp_path):
    make_checkpoint(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "cls": "os.system"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint class 'os.system'") as err:
        load_local(tmp_path / "ck")
    assert "\n" not in str(err.value)
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "hparams": {"n_layers": 2, "n_heads": 6,
                                                                               "d_head": 8}}))
    with pytest.raises(CheckpointError, match="do not fit HeadScorer"):
        load_local(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid checkpoint config"):
        load_local(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a headprobe checkpoint"):
        load_local(tmp_path)


def test_register_needs_from_checkpoint_and_from_pretrained_checks_the_class(tmp_path):
    with pytest.raises(TypeError, match="from_checkpoint"):
        register(type("NoLoader", (), {}))
    assert CLASSES["HeadScorer"] is HeadScorer

    @register
    class Plain(FromPretrained):
        @classmethod
        def from_checkpoint(cls, config, tensors):
            return cls()

    make_checkpoint(tmp_path / "ck")
    assert isinstance(HeadScorer.from_pretrained(tmp_path / "ck"), HeadScorer)
    with pytest.raises(CheckpointError, match="holds a HeadScorer, not a Plain"):
        Plain.from_pretrained(tmp_path / "ck")


def test_incompatible_activations_are_refused_naming_both(tmp_path):
    make_checkpoint(tmp_path / "ck")
    cfg = load_local(tmp_path / "ck").checkpoint_config_loaded
    cfg.check_compatible(store_meta())
    cfg.check_compatible(store_meta(layers=[0, 1, 2, 3]))
    for other in (store_meta(model_id="gpt2", weights_hash="fff999"), store_meta(hook_point="attn.c_proj:input"),
                  store_meta(layers=[0, 1]), store_meta(n_heads=4, d_head=12)):
        with pytest.raises(CheckpointError) as err:
            cfg.check_compatible(other)
        msg = str(err.value)
        assert "tiny-llama" in msg and other.model_id in msg and str(other.layers) in msg and "\n" not in msg
