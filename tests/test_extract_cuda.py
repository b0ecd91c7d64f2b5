"""Extraction on a CUDA device gives the CPU's rows (runs only where a GPU is present)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headprobe.extract import ExtractConfig, Store, extract
from helpers import make_task, tiny_loaded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_extraction_matches_cpu(tmp_path, family):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    loaded = tiny_loaded(family)
    stores = {}
    for device, side in (("cpu", "right"), ("cuda", "right"), ("cuda", "left")):
        loaded.model.to(device)
        cfg = ExtractConfig(positions="all", store_dtype="fp32", writes=True, padding_side=side, batch_tokens=96)
        with Store(extract(loaded, make_task(), tmp_path / f"{device}-{side}.h5", cfg, progress=False)) as s:
            stores[device, side] = (s.activations(), s.activations(name="write"), s.column("position"))
    z, w, pos = stores["cpu", "right"]
    for key in (("cuda", "right"), ("cuda", "left")):
        zc, wc, pc = stores[key]
        np.testing.assert_array_equal(pc, pos)
        np.testing.assert_allclose(zc, z, rtol=1e-4, atol=1e-4 * np.abs(z).max())
        np.testing.assert_allclose(wc, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
