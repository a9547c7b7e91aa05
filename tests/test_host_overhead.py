"""Host work per training step: pruneflow's module and callbacks add little to plain Lightning's loop.

Counted, not timed (``scripts/bench_host_overhead.py`` times the same arms side by side): the Python calls
of a window of ordinary training steps, under ``cProfile``, for a plain LightningModule without callbacks and
for ``ClassifierModule`` with pruneflow's per-step callbacks and ``ChannelPruning``. Call counts do not depend
on the machine's speed. The bound is the count measured when this test was written (1.08x: 4,276 against
3,965 calls; 1.14x before the callbacks hid their unused hooks), with little room: a callback hook or a
per-step walk added to the step path fails it.
"""

from __future__ import annotations

import cProfile
import importlib
import pstats
import sys
from typing import Any

import lightning as L
from helpers import REPO
from lightning.pytorch.callbacks import Callback

from pruneflow.callbacks.step_hooks import hide_unused_step_hooks

sys.path.insert(0, str(REPO / "scripts"))
bench_host_overhead = importlib.import_module("bench_host_overhead")

START, STEPS = 10, 10


class CallCount(Callback):
    """Python calls per training step over steps ``[START, START + STEPS)``."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile()
        self.per_step = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == START:
            self.profile.enable()
        elif trainer.global_step == START + STEPS:
            self.profile.disable()
            self.per_step = sum(entry[1] for entry in pstats.Stats(self.profile).stats.values()) / STEPS


def calls_per_step(arm: str, *extra: Callback) -> float:
    count = CallCount()
    bench_host_overhead.fit(arm, START + STEPS + 1, "cpu", [count, *extra])
    return count.per_step


def test_pruneflow_adds_little_to_plain_lightnings_step() -> None:
    lightning, pruneflow = calls_per_step("lightning"), calls_per_step("pruneflow")
    assert pruneflow <= 1.10 * lightning, f"{pruneflow:.0f} Python calls a step against Lightning's {lightning:.0f}"


def test_a_callback_costs_nothing_for_the_step_hooks_it_does_not_use() -> None:
    bare = calls_per_step("lightning")
    hidden = calls_per_step("lightning", hide_unused_step_hooks(Callback()))
    shown = calls_per_step("lightning", Callback())
    assert hidden - bare <= 12, "each skipped hook should cost Lightning one getattr and one callable()"
    assert shown - bare >= 60, "the count should see Lightning's loop calling the six empty hooks"
