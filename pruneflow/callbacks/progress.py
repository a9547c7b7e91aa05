"""Progress where a person watches, plain lines where a file listens.

On a terminal, Lightning's TQDM bar. Where standard output is not a terminal (``python train.py ... >
run.log``, every joblib or Slurm job's log) a bar writes thousands of ``\\r``-joined frames per epoch;
``EpochLines`` writes one line per training epoch (its training and validation figures), one per
validation run outside ``fit`` and one per test run, with the figures the bar shows.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks
from pruneflow.errors import ConfigError, is_count


def progress_for_stdout(refresh_rate: int = 20) -> ProgressBar:
    """The TQDM bar (refreshed every ``refresh_rate`` steps) on a terminal, else ``EpochLines``."""
    if not is_count(refresh_rate) or refresh_rate < 1:
        raise ConfigError(f"progress_bar_refresh_rate must be a positive integer, got {refresh_rate!r}")
    return TQDMBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLines()


def figures_read_at_refresh(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
    """The module's ``progress_bar_reads`` (names of logged values, e.g. ``train/loss_step``), read from the
    device now. Lightning converts every ``prog_bar=True`` step value to a Python number after *every* step
    (a host sync each, Lightning #20995); values logged without ``prog_bar`` and read here cost one read
    per refresh instead."""
    metrics = trainer.callback_metrics
    return {name: float(metrics[name]) for name in getattr(pl_module, "progress_bar_reads", ()) if name in metrics}


class TQDMBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing the module's ``progress_bar_reads`` too, read at each refresh only."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **figures_read_at_refresh(trainer, pl_module)}


def format_figures(figures: dict[str, Any]) -> str:
    return " ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in figures.items()
    )


class EpochLines(ProgressBar):
    """A Lightning progress bar that writes one plain line per epoch, validation and test, nothing per step.

    A training epoch's line is written once its figures are final — Lightning reduces the epoch's
    ``on_epoch`` values after every ``on_train_epoch_end`` hook — at the next epoch's start or the end of
    training: ``epoch 2/3: train/loss_epoch=0.41 train/acc=0.87 val/loss=0.35 val/acc=0.9 (29 steps, 2.1 s)``.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self._enabled = True
        self._epoch_started = 0.0
        self._finished_epoch: tuple[int, float] | None = None
        hide_unused_step_hooks(self)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def write(self, line: str) -> None:
        if self._enabled:
            print(line, file=self.stream or sys.stdout, flush=True)

    def epoch_figures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        figures = {**self.get_metrics(trainer, pl_module), **figures_read_at_refresh(trainer, pl_module)}
        return {name: value for name, value in figures.items() if name != "v_num" and not name.endswith("_step")}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_finished_epoch(trainer, pl_module)
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished_epoch = (trainer.current_epoch, time.perf_counter() - self._epoch_started)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_finished_epoch(trainer, pl_module)

    def _write_finished_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._finished_epoch is None:
            return
        epoch, seconds = self._finished_epoch
        self._finished_epoch = None
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self.write(
            f"epoch {epoch + 1}{total}: {format_figures(self.epoch_figures(trainer, pl_module))} "
            f"({trainer.global_step} steps, {seconds:.1f} s)"
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.write(f"validation: {format_figures(self._results(trainer, 'val/'))}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(f"test: {format_figures(self._results(trainer, 'test/'))}")

    @staticmethod
    def _results(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith(prefix)}
