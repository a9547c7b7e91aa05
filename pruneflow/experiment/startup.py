"""Where a run's start-up goes: phases from the process start to the end of the first training step.

``StartupPhases`` is both the run's stopwatch (``mark(phase)`` as ``run.train`` finishes building each part)
and a Lightning callback that marks the phases inside ``Trainer.fit``:

=================  ==================================================================================
phase              from the end of the previous phase to
=================  ==================================================================================
``imports``        ``run.train`` entered (from the process start: Python, torch, Lightning, Hydra)
``config``         the config validated, the network built (``auto`` settings depend on its size), the
                   ``auto`` settings resolved and ``config.yaml`` written
``data``           the data module's tensors read
``model``          the LightningModule and the callbacks built
``trainer``        the ``Trainer`` built
``device``         ``on_fit_start``: setup hooks, the model moved to its device (CUDA initialised)
``sanity_check``   the end of the sanity check's validation batches (0 where there are none)
``first_step``     the end of the first training step (the device synchronised)
=================  ==================================================================================

The run log prints them in one line and ``metrics.json`` records ``perf/startup_seconds`` (process start to
the first step's end) and ``perf/startup/<phase>_seconds``; ``python -m benchmarks startup`` compares the
first step's time with ``import torch, lightning``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks

log = logging.getLogger(__name__)

PHASES = ("imports", "config", "data", "model", "trainer", "device", "sanity_check", "first_step")


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux ``/proc``; None where that cannot be read)."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, up - start_ticks / os.sysconf("SC_CLK_TCK"))


class StartupPhases(Callback):
    """Seconds of each start-up phase (``PHASES``), marked in order.

    The first run of a process counts ``imports`` from the process start; a later run in the same process (the
    next job of a sequential sweep, a joblib worker's next job) imported nothing, so its ``imports`` is 0 and
    its phases start when it is built, not at the process start (which would count the earlier jobs).
    """

    process_started_a_run: ClassVar[bool] = False

    def __init__(self) -> None:
        now = time.perf_counter()
        self.seconds: dict[str, float] = {}
        if StartupPhases.process_started_a_run:
            self.seconds["imports"] = 0.0
            self._last = now
        else:
            self._last = now - (seconds_since_process_start() or 0.0)
        StartupPhases.process_started_a_run = True
        self._first_step_done = False
        hide_unused_step_hooks(self)

    def mark(self, phase: str) -> None:
        """End ``phase`` now (phases not reached before it, e.g. no sanity check, get 0)."""
        if phase in self.seconds or phase not in PHASES:
            return
        for earlier in PHASES[: PHASES.index(phase)]:
            self.seconds.setdefault(earlier, 0.0)
        now = time.perf_counter()
        self.seconds[phase] = now - self._last
        self._last = now

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("device")

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("sanity_check")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._first_step_done:
            return
        self._first_step_done = True
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.mark("first_step")
        self.on_train_batch_end = None  # type: ignore[method-assign]  # Lightning skips a hook set to None
        log.info("start-up %.2f s to the first step's end: %s", self.total,
                 ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.seconds.items()))  # fmt: skip

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def final_metrics(self) -> dict[str, Any]:
        if "first_step" not in self.seconds:
            return {}
        return {"perf/startup_seconds": round(self.total, 3),
                **{f"perf/startup/{phase}_seconds": round(s, 3) for phase, s in self.seconds.items()}}  # fmt: skip
