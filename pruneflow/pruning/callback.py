"""ChannelPruning: the Lightning Callback that masks channels by strategy and logs drift telemetry.

It works on any LightningModule: it prunes the convs of ``pl_module.<module>`` (default: the
module's ``model`` attribute when it has one, else the LightningModule itself), found by
``channels.find_prunable_layers``. Per training step (hook order in Lightning's automatic
optimization):

    on_train_batch_start     prune when the schedule says so; arm leak probes on measured steps
    forward / backward
    on_after_backward        gradient telemetry (before any gradient mask); taylor scores
    on_before_optimizer_step strategy.before_optimizer_step (gradient masking); on measured steps a
                             copy of the pruned rows
    optimizer.step
    on_train_batch_end       on measured steps the optimizer's share of the step; then
                             strategy.after_optimizer_step (re-zeroing), optimizer-state reset,
                             telemetry logged

Measured steps: every ``log_every_n_steps``, and every step of the ``burst_steps`` optimizer steps
after each pruning event (the transient: under SGD a ``weight``-pruned kernel jumps within a few
steps, between two regular logging points). Burst steps measure the pruned kernels and the
optimizer's share only (``DriftTelemetry.measure(transient_only=True)``); consumer drift, leak,
BatchNorm, histograms and channel-mask images stay on the regular interval. The eval-mode leak is measured on the first
validation batch of each validation epoch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from pruneflow.errors import ConfigError, is_count
from pruneflow.pruning.channels import PrunableLayer, find_prunable_layers, select_layers
from pruneflow.pruning.criteria import (
    CRITERIA,
    CRITERION_NAMES,
    EXPLICIT,
    ScoringContext,
    channels_to_prune,
    select_channels,
    taylor_contribution,
)
from pruneflow.pruning.dashboard import log_pruned_layers
from pruneflow.pruning.sparsity_schedule import PruningSchedule
from pruneflow.pruning.strategies import (
    STRATEGIES,
    MaskStrategy,
    current_strategy_name,
    make_strategy,
    zero_optimizer_state,
)
from pruneflow.pruning.telemetry import DriftTelemetry, custom_scalars_layout

log = logging.getLogger(__name__)


class ChannelPruning(Callback):
    """Prune output channels of convs with a masking ``strategy`` and measure whether they stay pruned.

    Args:
        strategy: one of ``control`` (select and measure, mask nothing), ``weight``, ``activation``,
            ``gradient``, ``parametrize``, ``hard``.
        amount: fraction of output channels removed per pruned layer, in [0, 1); never all of a layer.
        criterion: ``l1``, ``l2``, ``random``, ``bn_gamma``, ``taylor`` or ``explicit`` (use ``channels``).
        layers: module-name globs of convs to prune; default every conv with a channel point whose
            output does not feed a residual addition.
        channels: for ``explicit``: ``{module name: [channel indices]}``.
        schedule, at_epoch, at_step, start_epoch, end_epoch: see ``PruningSchedule``.
        reset_optimizer_state: zero the optimizer state (momentum, Adam moments) of pruned entries at
            pruning time and after every step.
        log_every_n_steps: telemetry interval in optimizer steps.
        burst_steps: telemetry every step for this many optimizer steps after each pruning event
            (0: no burst).
        taylor_batches: for ``taylor``: training steps whose |w·∂L/∂w| is summed before selecting.
        seed: for ``random``.
        module: attribute of the LightningModule holding the network (``"auto"``: ``model`` if present).
        static_masks: deprecated and ignored (a FutureWarning says so): the forward-pass masks are
            always installed at setup now.

    The strategy's forward-pass machinery (``activation``'s mask buffers and hooks, ``parametrize``'s
    parametrizations) is installed at ``setup`` for every selected layer, with nothing pruned: the
    network's parameter and buffer names are the same before and after pruning, so Lightning's own
    checkpoints resume with a plain ``Trainer.fit(ckpt_path=...)``, and a compiled graph traced with
    the masks is neither broken nor recompiled when pruning rewrites their values. Lightning calls
    ``setup``, then loads the weights, then ``load_state_dict``, which applies the saved masks.
    """

    def __init__(
        self,
        strategy: str = "activation",
        amount: float = 0.5,
        criterion: str = "l1",
        layers: Sequence[str] | None = None,
        channels: Mapping[str, Sequence[int]] | None = None,
        schedule: str = "one_shot",
        at_epoch: int | None = None,
        at_step: int | None = None,
        start_epoch: int = 0,
        end_epoch: int = 0,
        reset_optimizer_state: bool = False,
        log_every_n_steps: int = 50,
        burst_steps: int = 100,
        taylor_batches: int = 8,
        seed: int = 0,
        module: str | None = "auto",
        static_masks: bool | None = None,
    ) -> None:
        strategy = current_strategy_name(strategy)
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown mask strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if criterion not in CRITERION_NAMES:
            raise ConfigError(f"unknown mask.criterion {criterion!r}; choose one of: {', '.join(CRITERION_NAMES)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
            raise ConfigError(f"mask.amount must be a fraction in [0, 1), got {amount!r}")
        if criterion == EXPLICIT and not channels:
            raise ConfigError("mask.criterion=explicit needs mask.channels, e.g. mask.channels={features.0:[0,3]}")
        if channels and criterion != EXPLICIT:
            raise ConfigError(f"mask.channels is only used with mask.criterion=explicit, not {criterion!r}")
        if not is_count(log_every_n_steps) or log_every_n_steps < 1:
            raise ConfigError(f"mask.log_every_n_steps must be a positive integer, got {log_every_n_steps!r}")
        if not is_count(taylor_batches) or taylor_batches < 1:
            raise ConfigError(f"mask.taylor_batches must be a positive integer, got {taylor_batches!r}")
        if not is_count(seed) or seed < 0:
            raise ConfigError(f"mask.seed must be a non-negative integer, got {seed!r}")
        if not isinstance(reset_optimizer_state, bool):
            raise ConfigError(f"mask.reset_optimizer_state must be true or false, got {reset_optimizer_state!r}")
        if not is_count(burst_steps) or burst_steps < 0:
            raise ConfigError(f"mask.burst_steps must be a non-negative integer (0: no burst), got {burst_steps!r}")
        self.strategy_name = strategy
        self.strategy: MaskStrategy = make_strategy(strategy)
        self.amount = float(amount)
        self.criterion = criterion
        self.layer_patterns = list(layers) if layers is not None else None
        self.explicit_channels = {str(k): [int(c) for c in v] for k, v in (channels or {}).items()}
        # explicit lists carry their own counts: the schedule only says when (a target of 1 = "now").
        scheduled_amount = 1.0 if criterion == EXPLICIT else self.amount
        self.schedule = PruningSchedule(scheduled_amount, schedule, at_epoch, at_step, start_epoch, end_epoch)
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.log_every_n_steps = log_every_n_steps
        self.burst_steps = burst_steps
        self.taylor_batches = taylor_batches
        self.seed = seed
        self.module_attribute = module
        if static_masks is not None:
            warnings.warn(
                f"mask.static_masks={static_masks!r} is ignored and will be removed: masks are always installed "
                "at setup now; drop the setting",
                FutureWarning,
                stacklevel=2,
            )

        self.layers: list[PrunableLayer] = []
        self.pruned: dict[str, Tensor] = {}
        self.pruned_amount = 0.0
        self.pruning_steps: list[int] = []
        self.telemetry: DriftTelemetry | None = None
        self.history: dict[str, list[float]] = {}
        self._measure_now = False
        self._regular_step = False  # a log_every_n_steps step (histograms), not only a burst step
        # (step, drift/producer_l2) of every measured step: the transient figures of final_metrics.
        self.drift_trace: list[tuple[int, float]] = []
        self._last_logged_step: int | None = None
        self._taylor_pending: int | None = None
        self._taylor_scores: dict[str, Tensor] = {}
        self._rank_fingerprints: list[list[float]] = []
        self._masked: list[tuple[PrunableLayer, Tensor]] = []
        self._mask_images_pending = True  # the channel-mask images change only at pruning events

    # -- setup ------------------------------------------------------------------------------------
    def network(self, pl_module: L.LightningModule) -> nn.Module:
        if self.module_attribute in (None, ""):
            return pl_module
        if self.module_attribute == "auto":
            candidate = getattr(pl_module, "model", None)
            return candidate if isinstance(candidate, nn.Module) else pl_module
        candidate = getattr(pl_module, self.module_attribute, None)
        if not isinstance(candidate, nn.Module):
            raise ConfigError(f"mask.module={self.module_attribute!r} is not a submodule of {type(pl_module).__name__}")
        return candidate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every stage: `Trainer.validate/test(ckpt_path=...)` loads weights named as the masked network names them.
        if self.layers:
            return
        network = self.network(pl_module)
        all_layers = find_prunable_layers(network)
        self._check_explicit_channels(all_layers)
        patterns = self.layer_patterns
        if self.criterion == EXPLICIT and patterns is None:
            patterns = list(self.explicit_channels)
        self.layers = select_layers(all_layers, patterns)
        if not self.layers:
            raise ConfigError(f"{type(network).__name__} has no conv with a channel point to prune")
        if self.criterion == "bn_gamma":
            for layer in self.layers:
                CRITERIA["bn_gamma"](layer, ScoringContext())  # raises for a layer without BatchNorm
        for layer in self.layers:
            if layer.coupled:
                log.warning("%s feeds a residual addition: masking it silences one branch only", layer.name)
            if not layer.consumers_complete:
                log.warning(
                    "%s: not every consumer of its channels could be found; consumer drift is partial", layer.name
                )
        self.telemetry = DriftTelemetry(self.layers, self.strategy, dict(network.named_modules()))
        # Before Lightning loads a checkpoint's weights: parametrized names must exist for their keys to load.
        for layer in self.layers:
            self.strategy.prepare(layer)
        self._write_dashboard_layout(trainer)
        log.info("pruning %d layers with mask=%s: %s", len(self.layers), self.strategy_name,
                 ", ".join(layer.name for layer in self.layers))  # fmt: skip

    @rank_zero_only
    def _write_dashboard_layout(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout())

    def _check_explicit_channels(self, all_layers: list[PrunableLayer]) -> None:
        by_name = {layer.name: layer for layer in all_layers}
        for name, indices in self.explicit_channels.items():
            layer = by_name.get(name)
            if layer is None:
                raise ConfigError(
                    f"mask.channels names {name!r}, which is not a prunable conv; prunable convs: {', '.join(by_name)}"
                )
            bad = [i for i in indices if not 0 <= i < layer.num_channels]
            if bad:
                raise ConfigError(
                    f"mask.channels[{name}] has indices {bad} outside 0..{layer.num_channels - 1} "
                    f"({layer.num_channels} output channels)"
                )
            if len(set(indices)) >= layer.num_channels:
                raise ConfigError(
                    f"mask.channels[{name}] would remove all {layer.num_channels} channels; keep at least one"
                )

    # -- pruning ----------------------------------------------------------------------------------
    def _scores(self, layer: PrunableLayer) -> Tensor:
        context = ScoringContext(seed=self.seed, taylor_scores=self._taylor_scores)
        return CRITERIA[self.criterion](layer, context)

    def _new_masks(self, target: float) -> dict[str, Tensor]:
        masks = {}
        for layer in self.layers:
            already = self.pruned.get(layer.name, torch.zeros(layer.num_channels, dtype=torch.bool))
            if self.criterion == EXPLICIT:
                mask = torch.zeros(layer.num_channels, dtype=torch.bool)
                mask[self.explicit_channels.get(layer.name, [])] = True
                masks[layer.name] = mask | already
            else:
                count = channels_to_prune(layer.num_channels, target)
                masks[layer.name] = select_channels(self._scores(layer), count, already)
        return masks

    def prune(self, trainer: L.Trainer, target: float) -> None:
        """One pruning event: select up to ``target``, apply the strategy, snapshot references, reset state."""
        # Rank 0 decides and every rank applies the same masks (scores could differ in the last bit).
        masks = trainer.strategy.broadcast(self._new_masks(target), src=0)
        assert self.telemetry is not None
        for layer in self.layers:
            mask = masks[layer.name].to(layer.conv.weight.device)
            self.pruned[layer.name] = mask
            if bool(mask.any()):
                self.strategy.apply(layer, mask)
        self._refresh_masked()
        # Consumer references once every layer is pruned: a consumer that is itself a pruned producer has
        # its own kernels zeroed by then, and that is pruning, not drift.
        for layer, mask in self._masked:
            self.telemetry.on_pruned(layer, mask)
        self.pruned_amount = target
        self.pruning_steps.append(trainer.global_step)
        if self.reset_optimizer_state:
            self._zero_optimizer_state(trainer)
        counts = {name: int(mask.sum()) for name, mask in self.pruned.items()}
        log.info("step %d: pruned %s (mask=%s, criterion=%s)", trainer.global_step, counts, self.strategy_name,
                 self.criterion)  # fmt: skip

    def _refresh_masked(self) -> None:
        self._mask_images_pending = True
        # Decided once per pruning event on the host, so per-step hooks never ask the device `mask.any()`.
        self._masked = [
            (layer, mask)
            for layer in self.layers
            if (mask := self.pruned.get(layer.name)) is not None and bool(mask.any())
        ]

    def _zero_optimizer_state(self, trainer: L.Trainer) -> None:
        for optimizer in trainer.optimizers:
            for layer, mask in self._masked:
                zero_optimizer_state(optimizer, self.strategy.trainable_tensors(layer), mask)

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        target = self.schedule.target(trainer.current_epoch, trainer.global_step)
        if target > self.pruned_amount:
            if self.criterion == "taylor":
                self._gather_taylor_then_prune(trainer, target)
            else:
                self.prune(trainer, target)
        step = trainer.global_step
        self._regular_step = step % self.log_every_n_steps == 0
        self._measure_now = bool(self.pruned) and (self._regular_step or self.in_burst(step))
        assert self.telemetry is not None
        self.telemetry.arm(self._measure_now and self._regular_step)

    def in_burst(self, step: int) -> bool:
        """Whether the step taken at ``global_step == step`` is among a pruning event's first ``burst_steps``."""
        return any(0 <= step - event < self.burst_steps for event in self.pruning_steps)

    def _gather_taylor_then_prune(self, trainer: L.Trainer, target: float) -> None:
        if self._taylor_pending is None:
            self._taylor_pending = 0
            self._taylor_scores = {}
        elif self._taylor_pending >= self.taylor_batches:
            self.prune(trainer, target)
            self._taylor_pending = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._measure_now and self.telemetry is not None:
            self.telemetry.record_gradients()
        if self._taylor_pending is not None:
            for layer in self.layers:
                contribution = taylor_contribution(layer)
                if contribution is not None:
                    previous = self._taylor_scores.get(layer.name)
                    self._taylor_scores[layer.name] = contribution if previous is None else previous + contribution
            self._taylor_pending += 1

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for layer, mask in self._masked:
            self.strategy.before_optimizer_step(layer, mask)
        if self._measure_now and self.telemetry is not None:
            self.telemetry.snapshot_rows()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._measure_now and self.telemetry is not None:
            # Before re-zeroing and state resets: what the optimizer itself did to the pruned rows.
            self.telemetry.record_optimizer_step(trainer.optimizers)
        for layer, mask in self._masked:
            self.strategy.after_optimizer_step(layer, mask)
        if self.reset_optimizer_state and self._masked:
            self._zero_optimizer_state(trainer)
        if self._measure_now:
            regular = self._regular_step
            metrics = self.telemetry.measure(transient_only=not regular) if self.telemetry else {}
            self._log(trainer, metrics, histograms=regular)
            self._measure_now = False

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # One fixed batch (the unshuffled validation set's first) per validation epoch; not the sanity check.
        if self.telemetry is not None and self.pruned and batch_idx == 0 and dataloader_idx == 0:
            self.telemetry.arm_eval(not trainer.sanity_checking)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.telemetry is not None and self.telemetry.eval_leak_armed:
            self.telemetry.arm_eval(False)
            self._log(trainer, self.telemetry.measure_eval_leak(), histograms=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final state, unless the last logging step already measured it.
        if self.pruned and self.telemetry is not None and self._last_logged_step != trainer.global_step:
            self._log(trainer, self.telemetry.measure())
        self._rank_fingerprints = self._gather_fingerprints(trainer)

    def _gather_fingerprints(self, trainer: L.Trainer) -> list[list[float]]:
        """(mask checksum, final producer drift) of every rank: evidence that all ranks pruned alike."""
        checksum = sum(
            float((mask.nonzero().flatten().double() + 1).square().sum()) * (index + 1)
            for index, mask in enumerate(self.pruned.values())
        )
        drift = self.history.get("drift/producer_l2", [0.0])[-1]
        local = torch.tensor([checksum, drift], dtype=torch.float64, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(local)
        return gathered.view(-1, 2).tolist()

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], histograms: bool = True) -> None:
        if not metrics:
            return
        for tag, value in metrics.items():
            self.history.setdefault(tag, []).append(value)
        if "drift/producer_l2" in metrics:
            self.drift_trace.append((trainer.global_step, metrics["drift/producer_l2"]))
            self._last_logged_step = trainer.global_step
        self._log_to_loggers(trainer, metrics, histograms)

    @rank_zero_only
    def _log_to_loggers(self, trainer: L.Trainer, metrics: dict[str, float], histograms: bool) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if histograms and isinstance(logger, TensorBoardLogger):
                log_pruned_layers(logger.experiment, self._masked, self.strategy, trainer.global_step,
                                  mask_images=self._mask_images_pending)  # fmt: skip
        if histograms:
            self._mask_images_pending = False

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All a resumed run needs to continue exactly: plain tensors, numbers and strings only, so the
        checkpoint loads with ``torch.load(weights_only=True)``."""
        references = self.telemetry.consumer_reference if self.telemetry else {}
        return {
            "strategy": self.strategy_name,
            "criterion": self.criterion,
            "amount": self.amount,
            "reset_optimizer_state": self.reset_optimizer_state,
            "layers": {layer.name: layer.num_channels for layer in self.layers},
            "pruned": {name: mask.cpu() for name, mask in self.pruned.items()},
            "pruned_amount": self.pruned_amount,
            "pruning_steps": list(self.pruning_steps),
            "consumer_reference": {
                f"{producer}>{consumer}": ref.cpu() for (producer, consumer), ref in references.items()
            },
            "history": {tag: list(values) for tag, values in self.history.items()},
            "drift_trace": [[float(step), value] for step, value in self.drift_trace],
            "last_logged_step": -1 if self._last_logged_step is None else self._last_logged_step,
            "taylor_pending": -1 if self._taylor_pending is None else self._taylor_pending,
            "taylor_scores": {name: score.cpu() for name, score in self._taylor_scores.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Apply a checkpoint's mask state. Lightning calls this after ``setup`` (machinery installed,
        layers chosen) and after loading the weights, whether fitting, validating or testing."""
        if not self.layers:
            raise RuntimeError(
                "ChannelPruning.load_state_dict needs the layers chosen in setup; restore a checkpoint through "
                "Trainer.fit/validate/test(ckpt_path=...), which calls setup first"
            )
        self._restore(state_dict)

    def check_checkpoint(self, checkpoint: Mapping[str, Any], origin: str) -> None:
        """Refuse in one line, before any weight loads, a checkpoint not pruned or pruned by another strategy.

        Optional: ``load_state_dict`` checks the same, but only after Lightning has loaded the weights,
        which a ``parametrize`` checkpoint's renamed weights would already have failed.
        """
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None:
            raise ConfigError(f"checkpoint {origin} holds no {self.state_key} state: it was not a pruning run")
        self._check_compatible(state, origin)

    def _check_compatible(self, state: Mapping[str, Any], origin: str) -> None:
        saved = current_strategy_name(state["strategy"], warn=False)  # a checkpoint may hold a former name
        if saved != self.strategy_name:
            raise ConfigError(
                f"{origin} was pruned with mask={saved} but this run has mask={self.strategy_name}; "
                f"resume with mask={saved} or start a new run"
            )
        if self.layers and state["layers"] != {layer.name: layer.num_channels for layer in self.layers}:
            raise ConfigError(
                f"{origin} pruned layers {state['layers']} but this run's model and mask.layers give "
                f"{ {layer.name: layer.num_channels for layer in self.layers} }; it comes from another model"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        self._check_compatible(state, "the checkpoint")
        assert self.telemetry is not None
        by_name = {layer.name: layer for layer in self.layers}
        for name, mask in state["pruned"].items():
            layer = by_name[name]
            mask = mask.to(layer.conv.weight.device)
            self.pruned[name] = mask
            if bool(mask.any()):
                self.telemetry.set_mask(layer, mask)
                self.strategy.install(layer, mask)
        for key, reference in state["consumer_reference"].items():
            producer, consumer = key.split(">")
            device = by_name[producer].conv.weight.device
            self.telemetry.consumer_reference[(producer, consumer)] = reference.to(device)
        self.pruned_amount = float(state["pruned_amount"])
        self.pruning_steps = list(state["pruning_steps"])
        self.history = {tag: list(values) for tag, values in state["history"].items()}
        self.drift_trace = [(int(step), float(value)) for step, value in state.get("drift_trace", [])]
        self._last_logged_step = None if state["last_logged_step"] < 0 else int(state["last_logged_step"])
        self._taylor_pending = None if state["taylor_pending"] < 0 else int(state["taylor_pending"])
        self._taylor_scores = dict(state["taylor_scores"])
        self._refresh_masked()

    # -- reporting --------------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, Any]:
        """Final and max-since-pruning of every telemetry tag, with what was pruned, when and how."""
        report: dict[str, Any] = {
            "mask/strategy": self.strategy_name,
            "mask/criterion": self.criterion,
            "mask/amount": self.amount,
            "mask/reset_optimizer_state": self.reset_optimizer_state,
            "mask/pruning_steps": list(self.pruning_steps),
            "mask/pruned_channels": {name: int(mask.sum()) for name, mask in self.pruned.items()},
            "mask/rank_fingerprints": self._rank_fingerprints,
        }
        for tag, values in self.history.items():
            report[f"{tag}/final"] = values[-1]
            report[f"{tag}/max"] = max(values)
        report.update(transient_figures(self.drift_trace, self.pruning_steps, self.burst_steps))
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
