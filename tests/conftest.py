"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import FAMILIES

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~20x faster on one thread when the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)








@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param




