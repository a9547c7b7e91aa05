"""TrainingThroughput: training samples per second, as a Lightning callback (on in every ``train.py`` run).

It times the training batches only — after a warm-up, without validation, checkpointing and test — and
reports ``perf/train_samples_per_s``; it is the figure ``python -m benchmarks overhead`` compares with a
bare PyTorch loop. Works with any LightningModule.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks, show_step_hooks
from pruneflow.errors import ConfigError


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_size_of(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)


class TrainingThroughput(Callback):
    """Training samples per second of this rank, over the training batches after ``warmup_steps``.

    Segments run from a training batch's start until validation starts or the epoch ends (with the
    device synchronised at both ends); their sum is the training time. The warm-up leaves out the first steps, where
    allocators, cuDNN autotuning and ``torch.compile`` do their one-off work.
    """

    def __init__(self, warmup_steps: int = 20) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.seconds = 0.0
        self.samples = 0
        # CPU time of this process over the same segments: on a machine shared with other work, the work
        # done per sample, which wall time mixes with everyone else's load.
        self.cpu_seconds = 0.0
        self._segment_cpu_start = 0.0
        self._segment_start: float | None = None
        self._segment_samples = 0
        hide_unused_step_hooks(self)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._segment_start is None and trainer.global_step >= self.warmup_steps:
            synchronize(pl_module.device)
            self._segment_start = time.perf_counter()
            self._segment_cpu_start = time.process_time()
            self._segment_samples = 0
            show_step_hooks(self, ("on_train_batch_start",), False)  # until the segment closes

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._segment_start is not None:
            self._segment_samples += batch_size_of(batch)

    def _close_segment(self, pl_module: L.LightningModule) -> None:
        if self._segment_start is None:
            return
        synchronize(pl_module.device)
        if self._segment_samples:
            self.seconds += time.perf_counter() - self._segment_start
            self.cpu_seconds += time.process_time() - self._segment_cpu_start
            self.samples += self._segment_samples
        self._segment_start = None
        show_step_hooks(self, ("on_train_batch_start",), True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_segment(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_segment(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_segment(pl_module)

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    def final_metrics(self) -> dict[str, Any]:
        if self.samples_per_second is None:
            return {}
        return {
            "perf/train_samples_per_s": round(self.samples_per_second, 1),
            "perf/train_seconds_measured": round(self.seconds, 3),
            "perf/train_samples_measured": self.samples,
            "perf/train_cpu_seconds_measured": round(self.cpu_seconds, 3),
        }
