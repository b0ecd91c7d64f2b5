"""The few places where headprobe relies on Lightning behaviour that is not public API, each in one adapter with a
test (tests/test_lightning_api.py) that fails when Lightning changes it. Nothing else in headprobe reaches into
Lightning's private attributes."""
from __future__ import annotations

# --- data-parallel training of modules without gradients (the closed-form probes) ---------------------------------

# --- LightningCLI ---------------------------------------------------------------------------------------------------
def epoch_to_run(trainer: object | None) -> int:
    """The training epoch whose data a DataLoader iterator created now will serve (0 outside a trainer).

    Lightning creates the train iterator before it calls ``set_epoch`` on samplers, and its public
    ``trainer.current_epoch`` counts *completed* epochs, which is one behind when a run resumed from an epoch-end
    checkpoint makes its first iterator. The fit loop's count of *processed* epochs is the value Lightning then
    passes to ``set_epoch``: this adapter reads it (``trainer.fit_loop.epoch_progress.current.processed``)."""
    if trainer is None:
        return 0
    return int(trainer.fit_loop.epoch_progress.current.processed)
