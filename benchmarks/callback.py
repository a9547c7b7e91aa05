"""Benchmark: per-strategy cost and telemetry cost — training throughput with the ChannelPruning
callback against the same training without it.

    python -m benchmarks callback --root ../shared/data --strategies all          # per-strategy cost
    python -m benchmarks callback --root ../shared/data --log-every 1,10,50,200,off  # telemetry cost

MNIST, the default ConvNet, batch 128, pruning 50 % of every conv at step 0. An arm is
``<strategy>@<telemetry interval>`` (``off``: telemetry once, at step 0, and no burst); every other
arm measures every step for ``--burst-steps`` steps after pruning (default: ChannelPruning's), so
with pruning at step 0 the first timed steps are burst steps — a short benchmark weighs the burst
far more than a training run does (the table says how many timed steps were measured). Strategies
that mask in the forward pass (``activation``, ``parametrize``) install their masks at setup, so they
cost a step before pruning too: their ``<strategy>@<interval>/unpruned`` arms schedule pruning after
the run, timing the steps of a run that has not pruned yet. Each repetition trains
every arm for the same steps in this process, in alternating order (this machine is shared and
noisy), timing only the steps after a warm-up. The table reports each arm's median samples/s, its
ratio to the no-callback arm, and the median share of the timed wall time spent in telemetry —
measured directly by timing the telemetry's own code (device reductions, the one host transfer per
logging step, the TensorBoard writes), so it is not lost in the machine's noise as a small
throughput difference would be. ``--json`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from pruneflow import STRATEGIES, ChannelPruning, ClassifierModule
from pruneflow.data import MNISTDataModule, SyntheticDataModule
from pruneflow.models import ConvNet
from pruneflow.pruning import telemetry
from pruneflow.pruning.telemetry import DriftTelemetry
from pruneflow.pruning.telemetry_writer import TelemetryWriter

TELEMETRY_OFF = 10**9  # "off": measured at step 0 only


class TelemetryClock:
    """Wall seconds spent in the telemetry's code, by wrapping it (monkey-patching) while active."""

    TIMED = ((DriftTelemetry, "measure"), (DriftTelemetry, "record_gradients"), (TelemetryWriter, "log"),
             (telemetry, "pruned_channel_abs_mean"), (DriftTelemetry, "snapshot_rows"),
             (DriftTelemetry, "record_optimizer_step"), (DriftTelemetry, "measure_eval_leak"))  # fmt: skip

    def __init__(self) -> None:
        self.seconds = 0.0
        self.counting = False
        self._originals: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> TelemetryClock:
        for owner, name in self.TIMED:
            original = getattr(owner, name)
            self._originals.append((owner, name, original))
            setattr(owner, name, self._timed(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)
        self._originals.clear()

    def _timed(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self.counting:
                    self.seconds += time.perf_counter() - started

        return timed


class StepTimer(Callback):
    """Wall time of the optimizer steps after ``warmup`` steps, in total and step by step (from one
    batch start to the next); starts and stops the telemetry clock."""

    def __init__(self, warmup: int, clock: TelemetryClock) -> None:
        self.warmup, self.started, self.steps, self.seconds = warmup, 0.0, 0, 0.0
        self.step_seconds: list[float] = []
        self._last = 0.0
        self.clock = clock

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.started = now
            self.clock.counting = True
        elif trainer.global_step > self.warmup:
            self.step_seconds.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self.seconds = now - self.started
        self.steps = trainer.global_step - self.warmup
        self.clock.counting = False


def measured_steps(arm: dict[str, Any], steps: int, warmup: int) -> int:
    """How many of the timed steps measure telemetry (pruning at step 0: the burst, then the interval)."""
    if arm["strategy"] is None:
        return 0
    return sum(1 for s in range(warmup, warmup + steps) if s % arm["log_every"] == 0 or s < arm["burst"])


def train_once(
    datamodule: L.LightningDataModule, arm: dict[str, Any], steps: int, warmup: int, logdir: str
) -> tuple[float, float, float, list[float]]:
    """(samples/s, seconds in telemetry, timed seconds, seconds of each step) of one arm."""
    torch.manual_seed(0)
    model = ConvNet(input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    module = ClassifierModule(
        model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), datamodule.num_classes
    )
    clock = TelemetryClock()
    timer = StepTimer(warmup, clock)
    callbacks: list[Callback] = [timer]
    if arm["strategy"] is not None:
        at_step = None if arm["pruned"] else warmup + steps + 1  # None: at step 0
        callbacks.append(
            ChannelPruning(
                strategy=arm["strategy"], log_every_n_steps=arm["log_every"], at_step=at_step, burst_steps=arm["burst"]
            )
        )
    trainer = L.Trainer(
        max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=arm["name"]), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with clock:
        trainer.fit(module, datamodule=datamodule)
    return timer.steps * datamodule.batch_size / timer.seconds, clock.seconds, timer.seconds, timer.step_seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=["mnist", "synthetic"], default="mnist")
    parser.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw")
    parser.add_argument("--strategies", default="activation", help="comma list, or 'all'")
    parser.add_argument("--log-every", default="50", help="comma list of telemetry intervals; 'off': step 0 only")
    parser.add_argument(
        "--burst-steps", type=int, default=inspect.signature(ChannelPruning).parameters["burst_steps"].default,
        help="per-step telemetry after pruning (ChannelPruning's default); 'off' arms have none",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:

    if args.data == "mnist":
        datamodule: L.LightningDataModule = MNISTDataModule(root=args.root, batch_size=128)
    else:
        datamodule = SyntheticDataModule(num_train=20_000, batch_size=128)
    strategies = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    arms = [{"name": "no_callback", "strategy": None, "log_every": 0, "burst": 0, "pruned": False}]
    for s in strategies:
        for n in args.log_every.split(","):
            log_every = TELEMETRY_OFF if n == "off" else int(n)
            burst = 0 if n == "off" else args.burst_steps
            arms.append({"name": f"{s}@{n}", "strategy": s, "log_every": log_every, "burst": burst, "pruned": True})
            if STRATEGIES[s].acts_in_forward:
                unpruned = {"name": f"{s}@{n}/unpruned", "strategy": s, "log_every": log_every, "burst": burst}
                arms.append({**unpruned, "pruned": False})
    samples: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    shares: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    steps: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    per_measure: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    with tempfile.TemporaryDirectory() as logdir:
        for repeat in range(args.repeats):
            order = arms if repeat % 2 == 0 else arms[::-1]
            for arm in order:
                rate, telemetry_seconds, seconds, step_seconds = train_once(
                    datamodule, arm, args.steps, args.warmup, logdir
                )
                samples[arm["name"]].append(rate)
                shares[arm["name"]].append(telemetry_seconds / seconds)
                measured = measured_steps(arm, args.steps, args.warmup)
                per_measure[arm["name"]].append(telemetry_seconds / measured if measured else 0.0)
                steps[arm["name"]] += step_seconds
    # Two estimates of an arm's speed: its runs' samples/s (median over repetitions), and the batch over
    # its median step time across all repetitions. Load from other processes only ever adds time, so
    # the median step is the steadier figure; logging steps (1 in --log-every) are in the first only,
    # and in the telemetry share, measured directly.
    baseline = statistics.median(samples["no_callback"])
    baseline_step = statistics.median(steps["no_callback"])
    print(f"{'arm':<24}{'samples/s (median)':>20}{'vs no callback':>16}{'median step ms':>16}"
          f"{'vs no callback':>16}{'telemetry share':>17}{'measured steps':>16}{'ms per measure':>16}")  # fmt: skip
    rows = []
    for arm in arms:
        name = arm["name"]
        median, share, step = (
            statistics.median(samples[name]),
            statistics.median(shares[name]),
            statistics.median(steps[name]),
        )
        rows.append({"arm": name, "median_samples_per_s": median, "ratio": median / baseline,
                     "median_step_seconds": step, "step_ratio": baseline_step / step, "telemetry_share": share,
                     "runs": samples[name], "telemetry_shares": shares[name],
                     "measured_steps": measured_steps(arm, args.steps, args.warmup),
                     "median_seconds_per_measure": statistics.median(per_measure[name])})  # fmt: skip
        print(f"{name:<24}{median:>20.0f}{median / baseline:>16.3f}{step * 1e3:>16.2f}{baseline_step / step:>16.3f}"
              f"{share:>16.2%}{measured_steps(arm, args.steps, args.warmup):>16}"
              f"{statistics.median(per_measure[name]) * 1e3:>16.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))



