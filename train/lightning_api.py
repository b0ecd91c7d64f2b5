"""The few places where headprobe relies on Lightning behaviour that is not public API, each in one adapter with a
test (tests/test_lightning_api.py) that fails when Lightning changes it. Nothing else in headprobe reaches into
Lightning's private attributes."""
from __future__ import annotations

# --- data-parallel training of modules without gradients (the closed-form probes) ---------------------------------

# --- LightningCLI ---------------------------------------------------------------------------------------------------
