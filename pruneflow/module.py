"""ClassifierModule: the LightningModule that trains any ``nn.Module`` classifier with cross-entropy.

It owns the loss, the accuracy metrics, the train/val/test logging, the optimizer/schedule
wiring, and how the network runs: ``channels_last`` memory format and ``compile`` (``torch.compile``
of the network in place, so parameter names and checkpoints are those of the eager network). It
knows nothing about pruning: masking lives in a Callback so it composes with any LightningModule,
this one included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from pruneflow.errors import ConfigError

# torch.compile's modes: "reduce-overhead" replays CUDA graphs (one launch a step on a GPU; masks are buffers
# whose values change in place, so a replay reads the new masks), "max-autotune" also searches kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class ClassifierModule(L.LightningModule):
    """Cross-entropy classification of ``model``'s logits.

    ``optimizer`` is a partial optimizer (Hydra ``_partial_: true``) called with the parameters;
    ``scheduler`` (optional) a partial called as ``scheduler(optimizer, total_steps=...)`` and
    stepped every optimizer step. ``channels_last``: keep the network's 4-d weights and its input
    batches in channels-last memory format (faster convolutions on GPUs with tensor cores).
    ``compile``: ``torch.compile`` the network's forward (compiled lazily, at its first call), in
    ``compile_mode`` (``COMPILE_MODES``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        scheduler: SchedulerFactory | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str = "default",
    ) -> None:
        super().__init__()
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        for name, value in (("channels_last", channels_last), ("compile", compile)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compile:
            # In place: state_dict keys stay those of the eager network. "default" passes no mode, as before.
            model.compile(**({} if compile_mode == "default" else {"mode": compile_mode}))
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_fn = nn.CrossEntropyLoss()
        # validate_args=False: the argument checks read values back from the device (a host sync a step).
        metric = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, validate_args=False)
        self.train_acc, self.val_acc, self.test_acc = metric.clone(), metric.clone(), metric.clone()

    # Logged values pruneflow's progress bars read when they refresh (pruneflow.callbacks.progress).
    progress_bar_reads = ("train/loss_step", "train/loss_epoch")

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: torchmetrics.Metric) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss_fn(logits, labels)
        # `update`, not `accuracy(...)`: the per-batch value would be computed only to be thrown away.
        accuracy.update(logits.detach(), labels)
        on_step = stage == "train"
        # Not prog_bar on training steps: Lightning would read a prog_bar step value back after every step (a
        # host sync, Lightning #20995); the bars read `progress_bar_reads` when they refresh instead.
        # batch_size given: Lightning would otherwise walk the batch to find it, every step.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=not on_step, sync_dist=not on_step,
                 batch_size=len(labels))
        if not on_step:
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def on_train_epoch_end(self) -> None:
        # Once per epoch rather than a `self.log` per step: each `self.log` call costs Lightning about
        # 0.6 ms on CPU (it moves its result record to the value's device), ~2 % of a ConvNet step.
        # `compute()` reduces over DDP ranks itself.
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_acc.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
