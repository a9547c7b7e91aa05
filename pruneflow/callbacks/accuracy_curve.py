"""AccuracyCurve: test accuracy against training wall time, as a Lightning callback.

``+callbacks.accuracy_curve._target_=pruneflow.callbacks.AccuracyCurve`` evaluates the test split every
``every_n_steps`` training steps and at the end of training, and records ``(training seconds, wall-clock
time, step, accuracy)`` points, its own evaluation time left out of the training seconds;
``python -m benchmarks time-to-accuracy`` reads the curve from ``metrics.json``. Works with any
LightningModule whose forward returns logits.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks
from pruneflow.callbacks.throughput import synchronize
from pruneflow.errors import ConfigError


class AccuracyCurve(Callback):
    """Test accuracy every ``every_n_steps`` optimizer steps and at the end of training.

    Each point is ``{"seconds": training wall seconds since fit start without the curve's own
    evaluations, "time": time.time() at the point minus the evaluation time so far, "step", "epoch",
    "acc"}``. The test batches come from ``trainer.datamodule.test_dataloader()``; a datamodule with
    ``transform_batch(batch, train=False)`` (every pruneflow data set) prepares them as its test loop would.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.points: list[dict[str, float]] = []
        self._fit_start = 0.0
        self._evaluation_seconds = 0.0
        hide_unused_step_hooks(self)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._add_point(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.points or self.points[-1]["step"] != trainer.global_step:
            self._add_point(trainer, pl_module)

    @torch.no_grad()
    def test_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ConfigError("AccuracyCurve needs a LightningDataModule with a test_dataloader()")
        transform = getattr(datamodule, "transform_batch", None)
        was_training = pl_module.training
        pl_module.eval()
        correct = total = torch.zeros((), dtype=torch.int64, device=pl_module.device)
        for batch in datamodule.test_dataloader():
            images, labels = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            if transform is not None:
                images, labels = transform((images, labels), train=False)
            with trainer.precision_plugin.test_step_context():  # the test loop's precision (bf16 autocast, say)
                logits = pl_module(images)
            correct = correct + (logits.argmax(-1) == labels).sum()
            total = total + len(labels)
        pl_module.train(was_training)
        return float(correct) / max(int(total), 1)

    def _add_point(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        started, wall_clock = time.perf_counter(), time.time()
        accuracy = self.test_accuracy(trainer, pl_module)
        point = {
            "seconds": round(started - self._fit_start - self._evaluation_seconds, 3),
            "time": wall_clock - self._evaluation_seconds,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "acc": accuracy,
        }
        self._evaluation_seconds += time.perf_counter() - started
        self.points.append(point)
        self._log(trainer, accuracy)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, accuracy: float) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"curve/test_acc": accuracy}, step=trainer.global_step)

    def final_metrics(self) -> dict[str, Any]:
        return {"curve/test_acc": self.points, "curve/evaluation_seconds": round(self._evaluation_seconds, 3)}
