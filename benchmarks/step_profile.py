"""Where a training step's time goes: the PyTorch profiler over a window of steps of a real run.

A callback for ``train.py`` (any Lightning ``Trainer``): from optimizer step ``start`` it profiles
``steps`` training steps on the CPU and prints the wall time per step and the ops by self CPU time,
per step. Used to explain a benchmark's figure, e.g. why cutting MNIST's ConvNet speeds its steps
up less than its FLOPs ratio (the masked run, then the cut run, same window after the cut)::

    python train.py data.root=../shared/data mask=activation mask.reset_optimizer_state=true \\
        mask.at_epoch=1 mask.cut_at_epoch=1 trainer.max_epochs=2 data.limit_train=32000 \\
        +callbacks.profile._target_=benchmarks.step_profile.StepProfile +callbacks.profile.start=300

(drop ``mask.cut_at_epoch=1`` for the masked run). The profiler's own cost inflates the wall time a
little; compare two runs' rows with each other, not with a benchmark's samples/s.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from torch.profiler import ProfilerActivity, profile


class StepProfile(L.Callback):
    def __init__(self, start: int = 300, steps: int = 40, rows: int = 15) -> None:
        if start < 0 or steps < 1:
            raise ValueError(f"StepProfile needs start >= 0 and steps >= 1, got start={start}, steps={steps}")
        self.start, self.steps, self.rows = start, steps, rows
        self.profiler: profile | None = None
        self.started = 0.0
        self.report = ""

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.start and self.profiler is None and not self.report:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.start()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.profiler is None or trainer.global_step < self.start + self.steps:
            return
        wall_ms = (time.perf_counter() - self.started) * 1e3 / self.steps
        self.profiler.stop()
        events = sorted(self.profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        self.profiler = None
        lines = [f"steps {self.start}-{self.start + self.steps}: {wall_ms:.2f} ms a step (wall)",
                 "| op | self CPU ms a step | calls a step |", "| --- | --- | --- |"]  # fmt: skip
        for event in events[: self.rows]:
            per_step_ms = event.self_cpu_time_total / 1e3 / self.steps
            lines.append(f"| {event.key} | {per_step_ms:.3f} | {event.count / self.steps:g} |")
        self.report = "\n".join(lines)
        print(self.report, flush=True)
