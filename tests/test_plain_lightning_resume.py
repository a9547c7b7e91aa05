"""Restore as ordinary Lightning: a user's own LightningModule (torchvision resnet18, not ClassifierModule),
Lightning's own ModelCheckpoint, and a plain ``Trainer.fit(ckpt_path=...)`` in a fresh process — no
pruneflow entry point — resume every strategy bit-identically to an uninterrupted run.

The interrupted run is the uninterrupted one's configuration, crashed at the start of an epoch after
pruning; the resume happens in a new Python process (this file run as a script) with a new module and
a new callback, as a user restarting a job would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from pruneflow import STRATEGIES, ChannelPruning

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
STEPS_PER_EPOCH = 2
PRUNE_AT_STEP = 3  # the second step of epoch 1: a checkpoint written at the end of epoch 1 holds masks
CRASH_AT_STEP = 4  # the first step of epoch 2, after that checkpoint


class ResNetClassifier(L.LightningModule):
    """What a user writes: a torchvision network under ``self.net``, cross-entropy, SGD with momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = resnet18(num_classes=10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class Crash(Callback):
    """Stands in for a killed job: raises at the start of a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(STEPS_PER_EPOCH * 8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def fit(strategy: str, checkpoints: Path | None, ckpt_path: Path | None = None, crash_at: int | None = None) -> dict:
    """Train (or resume) the user's module with ChannelPruning, checkpointing into ``checkpoints`` unless it is
    None (the uninterrupted reference needs none); returns the end state (weights, pruning state)."""
    L.seed_everything(0, verbose=False)
    module = ResNetClassifier()
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=PRUNE_AT_STEP, log_every_n_steps=1, module="net")
    callbacks: list[Callback] = [pruning]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_last=True))
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, deterministic=True, logger=False,
        enable_checkpointing=checkpoints is not None, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return {"weights": module.state_dict(), "pruning": pruning.state_dict(), "global_step": trainer.global_step}


@pytest.fixture
def deterministic_cpu() -> Iterator[None]:
    """One thread (a reduction's order depends on the thread count) and deterministic kernels, restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def assert_identical(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == EPOCHS * STEPS_PER_EPOCH
    weights, reference_weights = resumed["weights"], reference["weights"]
    assert weights.keys() == reference_weights.keys()
    different = [key for key, value in weights.items() if not torch.equal(value, reference_weights[key])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    state, reference_state = resumed["pruning"], reference["pruning"]
    assert state["pruning_steps"] == reference_state["pruning_steps"] == [PRUNE_AT_STEP]
    assert state["pruned"].keys() == reference_state["pruned"].keys() and state["pruned"]
    for name, mask in state["pruned"].items():
        assert torch.equal(mask, reference_state["pruned"][name]), name
    for key, reference_value in reference_state["consumer_reference"].items():
        assert torch.equal(state["consumer_reference"][key], reference_value), key
    assert state["history"] == reference_state["history"]  # telemetry, before and after the crash, exactly


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_plain_lightning_resume_in_a_fresh_process_is_bit_identical(
    strategy: str, tmp_path: Path, deterministic_cpu: None
) -> None:
    reference = fit(strategy, checkpoints=None)
    with pytest.raises(RuntimeError, match="crash"):
        fit(strategy, tmp_path / "interrupted", crash_at=CRASH_AT_STEP)
    last = tmp_path / "interrupted" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == CRASH_AT_STEP

    end_state = tmp_path / "resumed.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, __file__, strategy, str(last), str(end_state)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(torch.load(end_state, weights_only=True), reference)


if __name__ == "__main__":
    # The fresh process: a new module and a new callback, restored by Lightning alone.
    strategy_name, checkpoint, out = sys.argv[1:]
    torch.set_num_threads(1)
    resumed_state = fit(strategy_name, Path(out).parent / "resumed_checkpoints", ckpt_path=Path(checkpoint))
    torch.save(resumed_state, out)
