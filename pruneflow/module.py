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
        self.val_acc, self.test_acc = metric.clone(), metric.clone()
        # The training epoch's loss and accuracy, summed on the device: a handful of ops a step, where
        # torchmetrics' update and Lightning's on_epoch accumulation take about fifty (each a kernel launch
        # on a GPU). Plain attributes, not buffers: checkpoints keep the same keys.
        self._train_loss_sum: Tensor | None = None
        self._train_correct: Tensor | None = None
        self._train_seen = 0

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
        # batch_size given: Lightning would otherwise walk the batch to find it.
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss_fn(logits, labels)
        # on_step only: Lightning keeps the value (read on logging steps), no per-step accumulation. Not
        # prog_bar: Lightning would read a prog_bar step value back after every step (a host sync, Lightning
        # #20995); the bars read `progress_bar_reads` when they refresh instead.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=len(labels))
        # In place, on tensors allocated at the epoch's first step: two kernels for the loss and accuracy sums.
        if self._train_loss_sum is None or self._train_correct is None:
            self._train_loss_sum = torch.zeros((), device=loss.device, dtype=torch.float32)
            self._train_correct = torch.zeros((), device=loss.device, dtype=torch.long)
        self._train_loss_sum.add_(loss.detach(), alpha=len(labels))
        self._train_correct.add_(logits.detach().argmax(-1).eq_(labels).sum())
        self._train_seen += len(labels)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._train_loss_sum is None or self._train_correct is None:
            return
        # Summed over DDP ranks (one all-reduce an epoch), then the epoch's mean loss and accuracy.
        seen = torch.tensor(float(self._train_seen), device=self._train_loss_sum.device)
        totals = torch.stack([self._train_loss_sum, self._train_correct.float(), seen])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("train/loss_epoch", totals[0] / totals[2])
        self.log("train/acc", totals[1] / totals[2], prog_bar=True)
        self._train_loss_sum = self._train_correct = None
        self._train_seen = 0

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
