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
