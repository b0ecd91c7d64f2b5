"""The Lightning behaviour that train/lightning_api.py's adapters rely on: each test fails when Lightning changes it."""
from __future__ import annotations


# --- LightningCLI: epoch_to_run, and the public LightningCLI.instantiate_trainer(**kwargs) that HeadprobeCLI uses ---
import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from headprobe.train.callbacks import SaveLast
from headprobe.train.lightning_api import epoch_to_run


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
