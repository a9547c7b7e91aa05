"""Benchmark: host work per training step — pruneflow's module and callbacks against plain Lightning.

    python -m benchmarks host-overhead --repeats 5                # CPU, a tiny network: the step is host work
    python -m benchmarks host-overhead --device cuda --repeats 5  # on a GPU: the host side of each step

The arms train the same network (a 2-stage ConvNet, 4 and 8 channels, 16×16 inputs, batch 32: small enough
that a step's time is Python, launches and Lightning's loop, not arithmetic) on the same in-memory batches
with the same ``Trainer`` settings (no logger, no checkpoints, no progress bar):

- ``lightning``: a plain LightningModule, what a user writes first: forward, cross-entropy,
  ``self.log("train/loss", loss)``, SGD;
- ``module``: pruneflow's ``ClassifierModule`` (its logging and accuracy metric), no callback;
- ``pruneflow``: ``ClassifierModule`` with pruneflow's default callbacks (throughput, non-finite-loss guard)
  and ``ChannelPruning(strategy="activation")`` pruning half of every conv at step 0, telemetry every 50
  steps (no burst: the 100 steps after a pruning event are measured steps, not ordinary ones).

Every repetition runs each arm in this process, in alternating order, and times steps ``--warmup`` to
``--steps`` (wall and process CPU time per step). Prints each arm's ratio to the ``lightning`` run of the same
repetition — its mean step and its median single step — and the median of those ratios over the repetitions
(target: ``pruneflow`` ≤ 1.05×): on a shared machine whose load drifts, runs adjacent in time compare fairly.
``tests/test_host_overhead.py`` guards the same comparison by counting the Python calls of a step instead of
timing it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from pruneflow import ChannelPruning, ClassifierModule, NonFiniteLossGuard, TrainingThroughput
from pruneflow.callbacks.step_hooks import hide_unused_step_hooks
from pruneflow.data import SyntheticDataModule
from pruneflow.models import ConvNet

ARMS = ("lightning", "module", "pruneflow")
SHAPE = (1, 16, 16)


class PlainModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def build_arm(arm: str) -> tuple[L.LightningModule, list[Callback]]:
    """The LightningModule and callbacks of ``arm``, on the same freshly seeded network."""
    torch.manual_seed(0)
    model = ConvNet(input_shape=SHAPE, num_classes=10, channels=(4, 8))
    if arm == "lightning":
        return PlainModule(model), []
    module = ClassifierModule(model, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), num_classes=10)
    if arm == "module":
        return module, []
    if arm == "pruneflow":
        pruning = ChannelPruning(strategy="activation", amount=0.5, at_step=0, log_every_n_steps=50, burst_steps=0)
        return module, [TrainingThroughput(), NonFiniteLossGuard(), hide_unused_step_hooks(pruning)]
    raise SystemExit(f"benchmarks host-overhead: error: unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def data(steps: int, device: str) -> SyntheticDataModule:
    datamodule = SyntheticDataModule(num_train=32 * steps, num_test=32, input_shape=SHAPE, batch_size=32, val_size=0,
                                     on_device=device != "cpu")  # fmt: skip
    return datamodule


def fit(arm: str, steps: int, device: str, callbacks: list[Callback]) -> L.LightningModule:
    """Train ``arm`` for ``steps`` steps with ``callbacks`` added to its own."""
    module, own = build_arm(arm)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[*callbacks, *own],
    )  # fmt: skip
    trainer.fit(module, datamodule=data(steps, device))
    return module


class StepClock(Callback):
    """Wall and CPU seconds per step over steps ``[start, end)`` (device synchronised at both ends): their mean,
    and the median of the single steps' wall times, which a garbage collection or a neighbour's burst on a
    shared machine moves far less than the mean."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.wall = self.cpu = self.median_step = 0.0
        self.steps: list[float] = []
        self._last = 0.0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.start:
            self._sync(pl_module)
            self.wall, self.cpu = time.perf_counter(), time.process_time()
            self._last = self.wall
        elif self.start < step <= self.end:
            now = time.perf_counter()
            self.steps.append(now - self._last)
            self._last = now
        if step == self.end:
            self._sync(pl_module)
            steps = self.end - self.start
            self.wall = (time.perf_counter() - self.wall) / steps
            self.cpu = (time.process_time() - self.cpu) / steps
            self.median_step = statistics.median(self.steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (1: the step's host path)")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            clock = StepClock(args.warmup, args.steps)
            fit(arm, args.steps + 1, args.device, [clock])
            runs[arm].append({"wall_ms": clock.wall * 1e3, "cpu_ms": clock.cpu * 1e3,
                              "median_step_ms": clock.median_step * 1e3})  # fmt: skip
            print(
                f"repeat {repeat}: {arm:<10} {clock.wall * 1e3:7.3f} ms a step, median step "
                f"{clock.median_step * 1e3:.3f} ms (CPU {clock.cpu * 1e3:.3f} ms)",
                flush=True,
            )
    # Paired: each arm against the plain Lightning run of the same repetition (adjacent in time), so a load that
    # drifts over the run cancels; the median of those ratios over the repetitions.
    paired = {arm: {key: [run[key] / base[key] for run, base in zip(values, runs["lightning"], strict=True)]
                    for key in ("wall_ms", "median_step_ms")} for arm, values in runs.items()}  # fmt: skip
    summary = {arm: {key: statistics.median(ratios) for key, ratios in by_key.items()}
               for arm, by_key in paired.items()}  # fmt: skip
    print(f"\nvs plain Lightning, paired by repetition, median of {args.repeats} (min-max):")
    for arm in ARMS[1:]:
        mean, step = paired[arm]["wall_ms"], paired[arm]["median_step_ms"]
        print(f"  {arm:<10} mean step {summary[arm]['wall_ms']:.3f} ({min(mean):.3f}-{max(mean):.3f}), "
              f"median step {summary[arm]['median_step_ms']:.3f} ({min(step):.3f}-{max(step):.3f})")  # fmt: skip
    ratio, step_ratio = summary["pruneflow"]["wall_ms"], summary["pruneflow"]["median_step_ms"]
    print(f"pruneflow / plain Lightning, host time a step: {ratio:.3f} mean, {step_ratio:.3f} median step "
          "(target <= 1.05)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "paired_ratios": paired, "ratios": summary, "ratio": ratio,
                                         "median_step_ratio": step_ratio}, indent=2))  # fmt: skip



