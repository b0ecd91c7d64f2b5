"""The Lightning behaviour that train/lightning_api.py's adapters rely on: each test fails when Lightning changes it."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from headprobe.train.lightning_api import keep_module_unwrapped


# --- data-parallel training of modules without gradients: keep_module_unwrapped ------------------------------------
class GradientFree(L.LightningModule):
    """A closed-form solver's shape: a buffer, no parameter that needs a gradient, no optimizer. It records the
    type of the model the strategy trains (the module itself, or a DDP wrapper around it)."""

    def __init__(self, adapt: bool):
        super().__init__()
        self.adapt, self.automatic_optimization, self.trained = adapt, False, []
        self.register_buffer("total", torch.zeros(()))

    def setup(self, stage: str) -> None:
        if self.adapt:
            assert keep_module_unwrapped(self.trainer.strategy)

    def training_step(self, batch, batch_idx: int) -> None:
        self.trained.append(type(self.trainer.strategy.model))
        assert dist.is_initialized() and self.trainer.world_size == 1  # a real (one-process) DDP run
        self.total += batch[0].sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)

    def configure_optimizers(self):
        return None


@pytest.fixture
def ddp_in_this_process():
    """Run a one-process DDP fit here, then undo what it leaves behind: the process group and the launcher's
    environment variables (MASTER_PORT, WORLD_SIZE, ...), which later trainers would read."""
    env = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def ddp_fit(module: L.LightningModule) -> None:
    L.Trainer(accelerator="cpu", strategy="ddp", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)


def test_the_adapter_replaces_configure_ddp_on_a_ddp_strategy_only():
    strategy, module = DDPStrategy(), GradientFree(adapt=False)
    assert getattr(strategy.configure_ddp, "__func__", None) is DDPStrategy.configure_ddp  # the hook still exists
    strategy.model = module
    assert keep_module_unwrapped(strategy)
    assert getattr(strategy.configure_ddp, "__func__", None) is not DDPStrategy.configure_ddp
    strategy.configure_ddp()  # Lightning's would wrap the module (and here fail: no process group)
    assert strategy.model is module
    assert DDPStrategy().configure_ddp.__func__ is DDPStrategy.configure_ddp  # on this object, not the class
    assert not keep_module_unwrapped(L.Trainer(accelerator="cpu", devices=1, logger=False).strategy)


def test_ddp_wraps_a_module_through_configure_ddp_and_the_adapter_leaves_it_unwrapped(ddp_in_this_process):
    """Lightning (2.x) wraps the module in DistributedDataParallel in ``configure_ddp`` during fit, after the module's
    setup hook; torch refuses a module with nothing to synchronise. After the adapter the module trains as itself."""
    with pytest.raises(RuntimeError, match="doesn't have any parameter that requires a gradient"):
        ddp_fit(GradientFree(adapt=False))  # what the adapter is for: Lightning still wraps through configure_ddp
    module = GradientFree(adapt=True)
    ddp_fit(module)
    assert module.trained == [GradientFree, GradientFree] and float(module.total) == 8.0
    assert not any(issubclass(t, DistributedDataParallel) for t in module.trained)
