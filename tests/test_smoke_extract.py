import numpy as np

from headprobe.extract import ExtractConfig, Store, extract
from headprobe.extract.tasks import get_task
from helpers import tiny_loaded


def test_extract_tiny_every_family(tmp_path, family):
    loaded = tiny_loaded(family)
    out = extract(loaded, get_task("capitals"), tmp_path / "a.h5", ExtractConfig(max_examples=20), progress=False)
    with Store(out) as s:
        L, H = loaded.model.config.num_hidden_layers, loaded.model.config.num_attention_heads
        assert s.shape[:3] == (20, L, H)
        assert np.isfinite(s.activations()).all()
        assert s.meta.task == "capitals" and s.meta.stage == "KR"
