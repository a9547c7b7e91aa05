"""The telemetry writer: which optimizer steps are measured, and where the measurements go.

Measured steps: every ``log_every_n_steps``, and every step of the ``burst_steps`` optimizer steps after
each pruning event (the transient: under SGD a ``weight``-pruned kernel jumps within a few steps, between
two regular logging points). Burst steps measure the pruned kernels and the optimizer's share only
(``DriftTelemetry.measure(transient_only=True)``); consumer drift, leak, BatchNorm, histograms and
channel-mask images stay on the regular interval. The eval-mode leak is measured on the first validation
batch of each validation epoch. Every measurement goes to the trainer's loggers (rank 0) and to the
history that ``report`` summarises and checkpoints carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from pruneflow.errors import ConfigError, is_count
from pruneflow.graph import PrunableLayer
from pruneflow.pruning.dashboard import log_pruned_layers
from pruneflow.pruning.strategies import MaskStrategy
from pruneflow.pruning.telemetry import DriftTelemetry, custom_scalars_layout

Masked = Sequence[tuple[PrunableLayer, Tensor]]


class TelemetryWriter:
    """Arms, measures and logs the ``DriftTelemetry`` of the masked layers; keeps what was logged."""

    def __init__(self, strategy: MaskStrategy, log_every_n_steps: int, burst_steps: int) -> None:
        if not is_count(log_every_n_steps) or log_every_n_steps < 1:
            raise ConfigError(f"mask.log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        if not is_count(burst_steps) or burst_steps < 0:
            raise ConfigError(f"mask.burst_steps must be a non-negative integer (0: no burst), got {burst_steps!r}")
        self.strategy = strategy
        self.log_every_n_steps, self.burst_steps = log_every_n_steps, burst_steps
        self.telemetry: DriftTelemetry | None = None
        self.history: dict[str, list[float]] = {}
        # (step, drift/producer_l2) of every measured step: the transient figures of the report.
        self.drift_trace: list[tuple[int, float]] = []
        self.last_logged_step: int | None = None  # of the last full measurement
        self.rank_fingerprints: list[list[float]] = []
        self._measure_now = False
        self._regular_step = False  # a log_every_n_steps step (histograms), not only a burst step
        self._mask_images_pending = True  # the channel-mask images change only at pruning events
        self._logged_at: tuple[int, set[str]] = (-1, set())  # the last step logged and its tags

    def attach(self, layers: Sequence[PrunableLayer], modules: dict[str, nn.Module]) -> None:
        """Measure ``layers``; after the mask's machinery, so its leak probe runs after the mask's hook."""
        self.telemetry = DriftTelemetry(layers, self.strategy, modules)

    def detach(self) -> None:
        """The cut: the pruned channels no longer exist; nothing left to measure."""
        if self.telemetry is not None:
            self.telemetry.remove()
        self.telemetry = None
        self._measure_now = False

    def on_masks(self, masked: Masked, pruned_now: bool) -> None:
        """New masks: references of the consumer slices on a pruning event, the masks alone on a restore."""
        assert self.telemetry is not None
        self._mask_images_pending = True
        for layer, mask in masked:
            if pruned_now:
                self.telemetry.on_pruned(layer, mask)
            else:
                self.telemetry.set_mask(layer, mask)

    @rank_zero_only
    def write_layout(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout())

    # -- one training step ------------------------------------------------------------------------
    def plan_step(self, step: int, anything_pruned: bool, events: Sequence[int]) -> None:
        """Whether the optimizer step taken at ``global_step == step`` is measured; arm the leak probe."""
        self._regular_step = step % self.log_every_n_steps == 0
        in_burst = any(0 <= step - event < self.burst_steps for event in events)
        self._measure_now = anything_pruned and (self._regular_step or in_burst)
        if self.telemetry is not None:
            self.telemetry.arm(self._measure_now and self._regular_step)

    @property
    def measuring(self) -> bool:
        """Whether the step planned last is measured."""
        return self._measure_now

    def record_gradients(self) -> None:
        if self._measure_now and self.telemetry is not None:
            self.telemetry.record_gradients()

    def snapshot_rows(self) -> None:
        if self._measure_now and self.telemetry is not None:
            self.telemetry.snapshot_rows()

    def record_optimizer_step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """What the optimizer itself did to the pruned rows: before re-zeroing and state resets."""
        if self._measure_now and self.telemetry is not None:
            self.telemetry.record_optimizer_step(optimizers)

    def write_step(self, trainer: L.Trainer, masked: Masked) -> None:
        if self._measure_now and self.telemetry is not None:
            metrics = self.telemetry.measure(transient_only=not self._regular_step)
            self.log(trainer, metrics, masked, histograms=self._regular_step)
        self._measure_now = False

    # -- validation and the end -------------------------------------------------------------------
    def arm_eval(self, armed: bool) -> None:
        if self.telemetry is not None:
            self.telemetry.arm_eval(armed)

    def write_eval_leak(self, trainer: L.Trainer, masked: Masked) -> None:
        if self.telemetry is not None and self.telemetry.eval_leak_armed:
            self.telemetry.arm_eval(False)
            self.log(trainer, self.telemetry.measure_eval_leak(), masked, histograms=False)

    def write_final(self, trainer: L.Trainer, masked: Masked, pruned: Mapping[str, Tensor]) -> None:
        """The final state in full (histograms, leak, consumers), unless the last full measurement was of it;
        then every rank's fingerprint."""
        if pruned and self.telemetry is not None and self.last_logged_step != trainer.global_step:
            self.log(trainer, self.telemetry.measure(), masked)
        self.rank_fingerprints = self._gather_fingerprints(trainer, pruned)

    def _gather_fingerprints(self, trainer: L.Trainer, pruned: Mapping[str, Tensor]) -> list[list[float]]:
        """(mask checksum, final producer drift) of every rank: evidence that all ranks pruned alike."""
        checksum = sum(
            float((mask.nonzero().flatten().double() + 1).square().sum()) * (index + 1)
            for index, mask in enumerate(pruned.values())
        )
        drift = self.history.get("drift/producer_l2", [0.0])[-1]
        local = torch.tensor([checksum, drift], dtype=torch.float64, device=trainer.strategy.root_device)
        return trainer.strategy.all_gather(local).view(-1, 2).tolist()

    # -- logging ----------------------------------------------------------------------------------
    def log(self, trainer: L.Trainer, metrics: dict[str, float], masked: Masked, histograms: bool = True) -> None:
        """Log ``metrics`` at the trainer's step, each tag once per step: a run that ends within a burst measures
        its last step twice (the burst's share, then the final state in full), of the same weights."""
        step, logged = self._logged_at
        if step != trainer.global_step:
            step, logged = trainer.global_step, set()
        metrics = {tag: value for tag, value in metrics.items() if tag not in logged}
        self._logged_at = (step, logged | set(metrics))
        if not metrics:
            return
        for tag, value in metrics.items():
            self.history.setdefault(tag, []).append(value)
        if "drift/producer_l2" in metrics:
            self.drift_trace.append((trainer.global_step, metrics["drift/producer_l2"]))
            if histograms:  # a full measurement; a burst step measures the kernels and optimizer shares only
                self.last_logged_step = trainer.global_step
        self.to_loggers(trainer, metrics, masked, histograms)

    @rank_zero_only
    def to_loggers(self, trainer: L.Trainer, metrics: dict[str, float], masked: Masked, histograms: bool) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if histograms and isinstance(logger, TensorBoardLogger):
                log_pruned_layers(logger.experiment, list(masked), self.strategy, trainer.global_step,
                                  mask_images=self._mask_images_pending)  # fmt: skip
        if histograms:
            self._mask_images_pending = False

    # -- checkpointing and the report -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        references = self.telemetry.consumer_reference if self.telemetry else {}
        return {
            "consumer_reference": {
                f"{producer}>{consumer}": ref.cpu() for (producer, consumer), ref in references.items()
            },
            "history": {tag: list(values) for tag, values in self.history.items()},
            "drift_trace": [[float(step), value] for step, value in self.drift_trace],
            "last_logged_step": -1 if self.last_logged_step is None else self.last_logged_step,
        }

    def load_state_dict(self, state: Mapping[str, Any], layers: Iterable[PrunableLayer]) -> None:
        if self.telemetry is not None:
            device = {layer.name: layer.producer.weight.device for layer in layers}
            for key, reference in state["consumer_reference"].items():
                producer, consumer = key.split(">")
                self.telemetry.consumer_reference[(producer, consumer)] = reference.to(device[producer])
        self.history = {tag: list(values) for tag, values in state["history"].items()}
        self.drift_trace = [(int(step), float(value)) for step, value in state.get("drift_trace", [])]
        self.last_logged_step = None if state["last_logged_step"] < 0 else int(state["last_logged_step"])

    def report(self, events: Sequence[int]) -> dict[str, Any]:
        """Final and max-since-pruning of every telemetry tag, and the transient after pruning."""
        report: dict[str, Any] = {}
        for tag, values in self.history.items():
            report[f"{tag}/final"] = values[-1]
            report[f"{tag}/max"] = max(values)
        report.update(transient_figures(self.drift_trace, events, self.burst_steps))
        return report


def transient_figures(trace: Sequence[tuple[int, float]], events: Sequence[int], burst_steps: int) -> dict[str, Any]:
    """The transient after pruning, from ``(step, drift/producer_l2)`` of the measured steps.

    ``burst/steps_to_half_drift``: optimizer steps from the first pruning event until the producer
    drift first reaches half its final value (left out when the final drift is 0: nothing moved);
    ``burst/drift_after_burst``: the drift measured ``burst_steps`` steps after the first event, and
    ``burst/drift_after_burst_per_event`` the same after each event (None where not measured).
    A measurement logged at step s describes the weights after the optimizer step taken at s − 1.
    """
    if not trace or not events:
        return {}
    figures: dict[str, Any] = {"burst/steps": burst_steps}
    final = trace[-1][1]
    first = events[0]
    if final > 0:
        reached = next((step for step, drift in trace if step > first and drift >= final / 2), None)
        if reached is not None:
            figures["burst/steps_to_half_drift"] = reached - first
    if burst_steps > 0:
        by_step = dict(trace)
        after = [by_step.get(event + burst_steps) for event in events]
        figures["burst/drift_after_burst_per_event"] = after
        if after[0] is not None:
            figures["burst/drift_after_burst"] = after[0]
    return figures
