"""Where no public Lightning API gives what pruneflow needs, it reads Lightning's internals; a Lightning without
them fails in one line naming its version, never silently (each read is removed here to see it)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call

from pruneflow import ChannelPruning
from pruneflow.callbacks.step_hooks import check_hooks_can_hide, hide_unused_step_hooks, show_step_hooks
from pruneflow.data import SyntheticDataModule
from pruneflow.errors import UnsupportedLightningError, lightning_version
from pruneflow.models.convnet import ConvNet

MISSING = rf"missing in the Lightning {lightning_version()} found; pruneflow supports lightning>=2\.6,<3"


@pytest.fixture
def hook_check_again() -> Iterator[None]:
    check_hooks_can_hide.cache_clear()
    yield
    check_hooks_can_hide.cache_clear()  # the next test checks the real Lightning again


def trainer() -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")


def test_the_installed_lightning_has_every_internal_read(hook_check_again: None) -> None:
    check_hooks_can_hide()
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    pruning = ChannelPruning(strategy="activation", cut_at_step=4)
    pruning.live_cut.watch_loads(trainer(), network, pruning.state_key, lambda: None)
    network.load_state_dict(network.state_dict())  # outside a restore: nothing to adopt


def test_hiding_hooks_on_a_lightning_without_its_hook_caller_fails_naming_the_version(
    monkeypatch: pytest.MonkeyPatch, hook_check_again: None
) -> None:
    monkeypatch.delattr(call, "_call_callback_hooks")
    with pytest.raises(UnsupportedLightningError, match=rf"_call_callback_hooks, .*{MISSING}"):
        hide_unused_step_hooks(Callback())


def calls_every_hook(trainer: L.Trainer, hook_name: str, *args: object) -> None:
    """A Lightning that calls the class's hook whatever the instance says."""
    for callback in trainer.callbacks:
        getattr(type(callback), hook_name)(callback, trainer, trainer.lightning_module, *args)


def test_hiding_hooks_on_a_lightning_that_would_not_skip_them_fails_naming_the_version(
    monkeypatch: pytest.MonkeyPatch, hook_check_again: None
) -> None:
    monkeypatch.setattr(call, "_call_callback_hooks", calls_every_hook)
    with pytest.raises(UnsupportedLightningError, match=rf"skipping a hook set to None.*{lightning_version()}"):
        show_step_hooks(Callback(), ("on_train_batch_end",), False)


def test_restoring_without_the_checkpoint_connector_fails_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-hook that gives a fresh network a cut checkpoint's widths reads the checkpoint being restored;
    it used to fall back to {} without it, and the restore then failed on shapes, far from the cause."""
    network = ConvNet(input_shape=(1, 12, 12), num_classes=3, channels=(8, 12))
    pruning = ChannelPruning(strategy="activation", cut_at_step=4)
    lightning_trainer = trainer()
    monkeypatch.delattr(lightning_trainer, "_checkpoint_connector")
    pruning.live_cut.watch_loads(lightning_trainer, network, pruning.state_key, lambda: None)
    internal = r"Trainer\._checkpoint_connector\._loaded_checkpoint"
    with pytest.raises(UnsupportedLightningError, match=rf"{internal}, .*{MISSING}"):
        network.load_state_dict(network.state_dict())


def test_augmenting_without_the_loop_progress_fails_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule = SyntheticDataModule(num_train=64, num_test=16, batch_size=8)
    lightning_trainer = trainer()
    lightning_trainer.training = True
    datamodule.trainer = lightning_trainer
    batch = (torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    monkeypatch.delattr(lightning_trainer.fit_loop.epoch_loop, "batch_progress")
    with pytest.raises(UnsupportedLightningError, match=rf"batch_progress\.current\.ready, .*{MISSING}"):
        datamodule.on_after_batch_transfer(batch, 0)
