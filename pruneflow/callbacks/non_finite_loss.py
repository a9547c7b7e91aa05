"""NonFiniteLossGuard: stop a run whose loss became NaN/inf, naming the step, before a bad checkpoint is written."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks
from pruneflow.errors import ConfigError


class NonFiniteLossError(ConfigError, ArithmeticError):
    """The training loss became NaN or infinite: a diverged run (lower the learning rate), reported in one line."""


class NonFiniteLossGuard(Callback):
    """Records, on the device, the first step whose loss is not finite; checks it every
    ``check_every_n_steps`` steps and before validation (so ``ModelCheckpoint`` never saves a diverged
    model). No host synchronisation between checks.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        if check_every_n_steps < 1:
            raise ConfigError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad_step: torch.Tensor | None = None
        hide_unused_step_hooks(self)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step - 1  # the step this loss belongs to
        if self._first_bad_step is None or self._first_bad_step.device != loss.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step, self._first_bad_step)
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step)
        if step >= 0:
            raise NonFiniteLossError(
                f"training loss became non-finite at step {step} (epoch {trainer.current_epoch}); stopped "
                f"before saving it; the last good checkpoint and the logs are kept"
            )
