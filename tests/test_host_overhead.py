"""Host work per training step: pruneflow's module and callbacks add little to plain Lightning's loop.

Counted, not timed (``python -m benchmarks host-overhead`` times the same arms side by side): the Python calls
of a window of ordinary training steps, under ``cProfile``, for a plain LightningModule without callbacks and
for ``ClassifierModule`` with pruneflow's per-step callbacks and ``ChannelPruning``. Call counts do not depend
on the machine's speed. The bound is the count measured when this test was written (1.08x: 4,276 against
3,965 calls; 1.14x before the callbacks hid their unused hooks), with little room: a callback hook or a
per-step walk added to the step path fails it.
"""

from __future__ import annotations

import cProfile
import pstats
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_strategies import TinyNet, toy_loader

from benchmarks import host_overhead as bench_host_overhead
from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.callbacks.step_hooks import hide_unused_step_hooks

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


class HookWatch(Callback):
    """After every callback's ``on_train_batch_start``: which of ``callback``'s optimizer-step hooks Lightning
    will call in this step (it skips one that is None)."""

    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.live: dict[int, tuple[bool, bool]] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        hooks = (self.callback.on_before_optimizer_step, self.callback.on_train_batch_end)
        self.live[trainer.global_step] = tuple(callable(hook) for hook in hooks)  # type: ignore[assignment]


@pytest.mark.parametrize(("strategy", "every_step"), [("activation", False), ("gradient", True), ("hard", True)])
def test_pruning_calls_its_optimizer_step_hooks_only_on_steps_with_work(strategy: str, every_step: bool) -> None:
    """Pruned at step 2, measured every 5 steps and for the 3 steps after the event: ``activation`` (nothing to do
    around an optimizer step) has its hooks called on those steps only, and they still log the telemetry;
    ``gradient`` and ``hard`` (a gradient mask, a re-zeroing) have them every step."""
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=2, log_every_n_steps=5, burst_steps=3)
    watch = HookWatch(pruning)
    module = ClassifierModule(TinyNet("relu"), lambda p: torch.optim.SGD(p, lr=0.05), num_classes=3)
    trainer = L.Trainer(max_steps=16, callbacks=[pruning, watch], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())
    measured = {2, 3, 4, 5, 10, 15}
    expected = {step: (every_step or step in measured,) * 2 for step in range(16)}
    assert watch.live == expected
    assert [step - 1 for step, _ in pruning.drift_trace] == sorted(measured)  # logged after the step: global_step + 1
