"""Run-time measurement callbacks: throughput counts exactly the timed training samples; the accuracy
curve evaluates the test split, leaves its own time out, and matches Lightning's test loop."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import lightning as L
import pytest
import torch

from pruneflow import ClassifierModule
from pruneflow.callbacks import AccuracyCurve, TrainingThroughput
from pruneflow.callbacks import throughput as throughput_module
from pruneflow.data import SyntheticDataModule
from pruneflow.models import ConvNet


class SlowSteps(L.Callback):
    """Makes each training step take at least ``seconds`` and each validation ``validation_seconds``."""

    def __init__(self, seconds: float, validation_seconds: float) -> None:
        self.seconds, self.validation_seconds = seconds, validation_seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)

    def on_validation_end(self, *args: Any) -> None:
        time.sleep(self.validation_seconds)


def fit(
    callbacks: list[L.Callback], epochs: int = 2, precision: str = "32-true", module_type: type = ClassifierModule
) -> tuple[L.Trainer, ClassifierModule, SyntheticDataModule]:
    torch.manual_seed(0)
    data = SyntheticDataModule(num_train=700, num_test=300, input_shape=(1, 12, 12), batch_size=50, val_size=100)
    model = ConvNet(input_shape=(1, 12, 12), num_classes=10, channels=(4, 8))
    module = module_type(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), num_classes=10)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, precision=precision,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer, module, data


class StepClock:
    """A ``time`` module for the throughput callback whose ``perf_counter`` moves only when ``SlowSteps``
    advances it: the measured seconds are then exact, whatever the speed or load of the machine."""

    def __init__(self) -> None:
        self.now = 0.0
        self.process_time = time.process_time

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_throughput_counts_the_training_samples_after_warmup_and_excludes_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = StepClock()
    monkeypatch.setattr(throughput_module, "time", clock)
    monkeypatch.setattr(time, "sleep", clock.sleep)  # SlowSteps' steps and validations advance the clock only
    throughput = TrainingThroughput(warmup_steps=3)
    fit([throughput, SlowSteps(seconds=0.02, validation_seconds=1.0)], epochs=2)
    # 600 training images in 12 batches of 50 per epoch; the first 3 steps are warm-up.
    assert throughput.samples == (2 * 12 - 3) * 50
    # Exactly the 21 timed steps of 20 ms; the three 1 s validations (sanity check, two epochs) are not in it.
    assert clock.now == pytest.approx(24 * 0.02 + 3 * 1.0)
    assert throughput.seconds == pytest.approx(21 * 0.02)
    metrics = throughput.final_metrics()
    assert metrics["perf/train_samples_per_s"] == pytest.approx(throughput.samples / throughput.seconds, rel=1e-3)


class SlowCurve(AccuracyCurve):
    """An accuracy curve whose evaluations take at least 0.4 s each."""

    def test_accuracy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        time.sleep(0.4)
        return super().test_accuracy(trainer, pl_module)


def test_accuracy_curve_matches_the_test_loop_and_leaves_its_evaluation_out_of_the_clock() -> None:
    curve = SlowCurve(every_n_steps=5)
    started = time.perf_counter()
    trainer, module, data = fit([curve], epochs=2)
    fit_seconds = time.perf_counter() - started
    assert [p["step"] for p in curve.points] == [5, 10, 15, 20, 24]
    assert all(b["seconds"] > a["seconds"] for a, b in zip(curve.points, curve.points[1:], strict=False))
    tested = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    assert curve.points[-1]["acc"] == pytest.approx(tested, abs=1e-6)
    # Five evaluations of >= 0.4 s: on the fit's clock, but not on the curve's.
    evaluation = curve.final_metrics()["curve/evaluation_seconds"]
    assert evaluation >= 5 * 0.4
    assert curve.points[-1]["seconds"] <= fit_seconds - 5 * 0.4
    assert curve.points[-1]["time"] <= time.time() - 5 * 0.4


class LogitTypes(ClassifierModule):
    """Records the dtype of the logits of every evaluation-mode forward."""

    evaluated: ClassVar[list[torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not self.training:
            self.evaluated.append(logits.dtype)
        return logits


def test_accuracy_curve_evaluates_in_the_precision_of_the_trainers_test_loop() -> None:
    """Under ``bf16-mixed`` the test loop runs the network in bf16 autocast; the curve must too, or its last
    point is another model's accuracy than ``test/acc``."""
    curve = AccuracyCurve(every_n_steps=1000)
    trainer, module, _ = fit([curve], epochs=1, precision="bf16-mixed", module_type=LogitTypes)
    LogitTypes.evaluated.clear()
    curve.test_accuracy(trainer, module)
    assert LogitTypes.evaluated and set(LogitTypes.evaluated) == {torch.bfloat16}


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_measurement_intervals_are_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive integer, got"):
        AccuracyCurve(every_n_steps=bad)  # type: ignore[arg-type]
    if bad != 0:
        with pytest.raises(ValueError, match=r"warmup_steps must be a non-negative integer, got"):
            TrainingThroughput(warmup_steps=bad)  # type: ignore[arg-type]
