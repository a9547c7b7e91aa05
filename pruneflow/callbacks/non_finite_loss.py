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
    """Keeps each step's loss on the device (a reference, no kernel) and checks them every
    ``check_every_n_steps`` steps, before validation and at the epoch's end (so ``ModelCheckpoint`` never saves a
    diverged model), naming the first step whose loss is not finite. No host synchronisation between checks.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        if check_every_n_steps < 1:
            raise ConfigError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        # The losses since the last check, each with its step: under gradient accumulation several a step.
        self._losses: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._checked_at = 0  # the global step last checked at (under accumulation, many batches end at one)
        hide_unused_step_hooks(self)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # The step this loss belongs to: the one just taken when the batch ended it, else the one accumulating.
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        ended_a_step = (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == trainer.num_training_batches
        self._losses.append(loss.detach())
        self._steps.append(trainer.global_step - 1 if ended_a_step else trainer.global_step)
        if trainer.global_step % self.check_every_n_steps == 0 and trainer.global_step != self._checked_at:
            self._checked_at = trainer.global_step
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        if not self._losses:
            return
        device = self._losses[-1].device
        losses, steps = torch.stack([loss.float().to(device) for loss in self._losses]), self._steps
        self._losses, self._steps = [], []
        finite = torch.isfinite(losses)
        if not bool(finite.all()):  # one read back a check
            step = steps[int(finite.logical_not().int().argmax())]
            raise NonFiniteLossError(
                f"training loss became non-finite at step {step} (epoch {trainer.current_epoch}); stopped "
                f"before saving it; the last good checkpoint and the logs are kept"
            )
