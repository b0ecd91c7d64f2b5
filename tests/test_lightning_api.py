"""The Lightning behaviour that train/lightning_api.py's adapters rely on: each test fails when Lightning changes it."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from headprobe.train.callbacks import SaveLast
from headprobe.train.lightning_api import epoch_to_run, keep_module_unwrapped


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


# --- LightningCLI: epoch_to_run, and the public LightningCLI.instantiate_trainer(**kwargs) that HeadprobeCLI uses ---
class EpochLog(SequentialSampler):
    """Records the epochs Lightning passes to ``set_epoch``."""

    def __init__(self, data, log: list[int]):
        super().__init__(data)
        self.log = log

    def set_epoch(self, epoch: int) -> None:
        self.log.append(epoch)


class IterLog(DataLoader):
    """Records ``epoch_to_run(trainer)`` each time an epoch's iterator is created."""

    def __init__(self, module: L.LightningModule, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.module = module

    def __iter__(self):
        self.module.at_iter.append(epoch_to_run(self.module.trainer))
        return super().__iter__()


class TwoStepsAnEpoch(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer, self.at_iter, self.set_epochs = torch.nn.Linear(2, 1), [], []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.randn(4, 2))
        return IterLog(self, data, sampler=EpochLog(data, self.set_epochs), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, limits: dict, ckpt=None) -> TwoStepsAnEpoch:
    module = TwoStepsAnEpoch()
    trainer = L.Trainer(**limits, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SaveLast(str(tmp_path))])
    trainer.fit(module, ckpt_path=ckpt, weights_only=False)
    return module


@pytest.mark.parametrize("first,then", [({"max_epochs": 2}, {"max_epochs": 4}),
                                        ({"max_steps": 4, "max_epochs": -1}, {"max_steps": 8, "max_epochs": -1})],
                         ids=["epochs", "steps"])
def test_epoch_to_run_is_the_epoch_lightning_gives_samplers_also_on_resume(tmp_path, first, then):
    """At the creation of each epoch's train iterator (before Lightning's ``set_epoch``), the adapter names the epoch
    that ``set_epoch`` then receives: in a fresh run and in one resumed from an epoch-end checkpoint (where the public
    ``trainer.current_epoch`` still says 1 when the first iterator is made)."""
    fresh = fit(tmp_path, first)
    assert fresh.at_iter == fresh.set_epochs == [0, 1]
    resumed = fit(tmp_path, then, ckpt=tmp_path / "last.ckpt")
    assert resumed.at_iter == resumed.set_epochs and resumed.at_iter[:2] == [2, 3]
    assert epoch_to_run(None) == 0


class Tiny(L.LightningModule):
    def __init__(self, width: int = 2):
        super().__init__()
        self.layer = torch.nn.Linear(width, 1)


class Always(L.Callback):
    """A callback given through ``trainer_defaults``."""


class Ours(L.Callback):
    """A callback that HeadprobeCLI adds through ``instantiate_trainer(callbacks=...)``."""


class Overriding(LightningCLI):
    """Does what HeadprobeCLI.instantiate_trainer does: reads the instantiated trainer settings from ``config_init``
    and overrides some of them through the public ``instantiate_trainer(**kwargs)``."""

    def instantiate_trainer(self, **kwargs):
        self.seen = dict(self.config_init.get("trainer"))
        kwargs.update(callbacks=[*self.seen["callbacks"], Ours()], default_root_dir=self.root, logger=False)
        return super().instantiate_trainer(**kwargs)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_instantiate_trainer_kwargs_override_the_settings_and_the_cli_still_adds_its_callbacks(tmp_path, monkeypatch):
    monkeypatch.setattr(Overriding, "root", str(tmp_path), raising=False)
    cli = Overriding(Tiny, run=False, trainer_defaults={"callbacks": [Always()]}, save_config_callback=SaveConfigCallback,
                     args=["--trainer.max_epochs", "3", "--trainer.callbacks", '[{"class_path": "'
                           'lightning.pytorch.callbacks.LearningRateMonitor"}]', "--trainer.enable_progress_bar", "false"])
    assert [type(c) for c in cli.seen["callbacks"]] == [LearningRateMonitor]  # config_init holds instantiated callbacks
    kinds = [type(c) for c in cli.trainer.callbacks]
    for kind in (LearningRateMonitor, Ours, Always, SaveConfigCallback):
        assert kinds.count(kind) == 1, kinds  # kwargs replace the configured list; the CLI appends its own
    assert cli.trainer.default_root_dir == str(tmp_path) and cli.trainer.max_epochs == 3 and cli.trainer.logger is None
