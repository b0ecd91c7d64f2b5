"""The few places where headprobe relies on Lightning behaviour that is not public API, each in one adapter with a
test (tests/test_lightning_api.py) that fails when Lightning changes it. Nothing else in headprobe reaches into
Lightning's private attributes."""
from __future__ import annotations

# --- data-parallel training of modules without gradients (the closed-form probes) ---------------------------------
def keep_module_unwrapped(strategy: object) -> bool:
    """Make a data-parallel ``strategy`` (Lightning's DDPStrategy) train the module unwrapped; True if it did.

    Call it from the module's ``setup()`` hook: Lightning calls ``strategy.setup(trainer)`` after that hook, and
    when fitting it calls ``strategy.configure_ddp()``, which wraps the module in torch's DistributedDataParallel.
    torch refuses to wrap a module with no parameter that needs a gradient (the closed-form probes: they sum their
    statistics over ranks themselves), so the adapter replaces ``configure_ddp`` on this strategy object with a
    no-op: the module then runs as in evaluation, unwrapped. Strategies without ``configure_ddp`` (one device) are
    left alone. ``tests/test_lightning_api.py`` fails if Lightning stops calling or wrapping through it."""
    if not callable(getattr(strategy, "configure_ddp", None)):
        return False
    strategy.configure_ddp = lambda: None
    return True


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
