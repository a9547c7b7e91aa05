"""ChannelPruning: the Lightning Callback that masks channels by strategy and logs drift telemetry.

It works on any LightningModule: it prunes the channel spaces of ``pl_module.<module>`` (default: the
module's ``model`` attribute when it has one, else the LightningModule itself, else — when the
LightningModule defines no ``forward`` — the one submodule with weights it holds), read from the
channel graph (``channels.trace_channel_graph``). A space is selected whole: every producer of a
coupled group or of a depthwise chain gets the same mask. Per training step (hook order in
Lightning's automatic optimization):

    on_train_batch_start     prune when the schedule says so; cut the pruned channels out at
                             ``cut_at_epoch`` / ``cut_at_step``; arm leak probes on measured steps
    forward / backward       (every micro-batch of an accumulation window)
    on_before_optimizer_step once per optimizer step, with its whole gradient: gradient telemetry and
                             the criterion's gradients (before any gradient mask), then
                             strategy.before_optimizer_step (gradient masking); on measured steps a
                             copy of the pruned rows
    optimizer.step
    on_train_batch_end       after an optimizer step only: on measured steps the optimizer's share of the step; then
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
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from pruneflow.errors import ConfigError, is_count
from pruneflow.pruning.channels import ChannelSpace, PrunableLayer, select_spaces, trace_channel_graph
from pruneflow.pruning.criteria import EXPLICIT, Criterion, Explicit, make_criterion
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


def defines_forward(module: nn.Module) -> bool:
    return type(module).forward is not L.LightningModule.forward


def held_network(pl_module: L.LightningModule) -> nn.Module:
    """The network a LightningModule without ``forward`` holds: its one direct submodule with weights."""
    held = [(name, child) for name, child in pl_module.named_children() if next(child.parameters(), None) is not None]
    if len(held) != 1:
        raise ConfigError(
            f"{type(pl_module).__name__} defines no forward, so it cannot be traced; point ChannelPruning at the "
            f"network it holds with module=<attribute> (its submodules with weights: "
            f"{', '.join(name for name, _ in held) or 'none'})"
        )
    name, network = held[0]
    log.info("%s defines no forward: pruning the network it holds, %s", type(pl_module).__name__, name)
    return network


@torch.no_grad()
def eval_outputs(network: nn.Module, inputs: Tensor) -> Tensor:
    """``network``'s outputs in eval mode (BatchNorm's running statistics untouched, no dropout draws), every
    module's training flag restored after. Through ``forward``, not ``__call__``: a network compiled in place
    would otherwise compile an eval-mode graph (twice, around a cut) for this one look."""
    flags = [(module, module.training) for module in network.modules()]
    network.eval()
    try:
        return network.forward(inputs).float()
    finally:
        for module, training in flags:
            module.training = training


class ChannelPruning(Callback):
    """Prune channel spaces (convs' and linear layers' outputs) with a masking ``strategy`` and measure
    whether they stay pruned.

    Args:
        strategy: one of ``control`` (select and measure, mask nothing), ``weight``, ``activation``,
            ``gradient``, ``parametrize``, ``hard``.
        amount: fraction of channels removed per pruned channel space, in [0, 1); never all of one.
        criterion: ``l1``, ``l2``, ``random``, ``bn_gamma``, ``taylor`` or ``explicit`` (use ``channels``).
        layers: module-name globs of producers (convs, linear layers) whose channel spaces are pruned;
            a glob naming one member of a group selects the whole group. Default: every prunable
            space (coupled groups only with ``groups``).
        groups: include coupled groups (residual additions, squeeze-and-excitation products) in the
            default selection and allow globs to select them.
        channels: for ``explicit``: ``{module name: [channel indices]}``.
        schedule, at_epoch, at_step, start_epoch, end_epoch: see ``PruningSchedule``.
        reset_optimizer_state: zero the optimizer state (momentum, Adam moments) of pruned entries at
            pruning time and after every step.
        log_every_n_steps: telemetry interval in optimizer steps.
        burst_steps: telemetry every step for this many optimizer steps after each pruning event
            (0: no burst).
        taylor_batches: for ``taylor``: training steps whose |w·∂L/∂w| is summed before selecting.
        seed: for ``random``.
        module: attribute of the LightningModule holding the network (``"auto"``: ``model`` if present,
            else the module itself, else — without a ``forward`` — the one submodule with weights).
        cut_at_epoch, cut_at_step: cut the pruned channels out of the network at the start of this
            epoch (or at this global step), inside the running fit, and train on the smaller network
            from then on (see ``_cut``); after the last pruning event. None: never.
        cut_changes_outputs: allow the cut for strategies that leave pruned channels alive (all but
            ``activation``), which changes the network's outputs; ``metrics.json`` reports the gap.
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
        groups: bool = False,
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
        cut_at_epoch: int | None = None,
        cut_at_step: int | None = None,
        cut_changes_outputs: bool = False,
    ) -> None:
        strategy = current_strategy_name(strategy)
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown mask strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
            raise ConfigError(f"mask.amount must be a fraction in [0, 1), got {amount!r}")
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
        if not isinstance(groups, bool):
            raise ConfigError(f"mask.groups must be true or false, got {groups!r}")
        self.strategy_name = strategy
        self.strategy: MaskStrategy = make_strategy(strategy)
        self.amount = float(amount)
        self.criterion = criterion
        self.importance: Criterion = make_criterion(criterion, channels, taylor_batches, seed)
        self.layer_patterns = list(layers) if layers is not None else None
        self.groups = groups
        # explicit lists carry their own counts: the schedule only says when (a target of 1 = "now").
        scheduled_amount = 1.0 if criterion == EXPLICIT else self.amount
        self.schedule = PruningSchedule(scheduled_amount, schedule, at_epoch, at_step, start_epoch, end_epoch)
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.log_every_n_steps = log_every_n_steps
        self.burst_steps = burst_steps
        self.module_attribute = module
        if static_masks is not None:
            warnings.warn(
                f"mask.static_masks={static_masks!r} is ignored and will be removed: masks are always installed "
                "at setup now; drop the setting",
                FutureWarning,
                stacklevel=2,
            )
        self.cut_at_epoch, self.cut_at_step = cut_at_epoch, cut_at_step
        self.cut_changes_outputs = cut_changes_outputs
        self._check_cut_settings()

        # The chosen spaces and their producers (modules of the masked network); emptied by a cut, which
        # replaces those modules, so that the callback holds no full-size copy of them.
        self.spaces: list[ChannelSpace] = []
        self.layers: list[PrunableLayer] = []
        self.layer_widths: dict[str, int] = {}  # each chosen producer's width at setup: checkpoints compare it
        self._set_up = False
        self.pruned: dict[str, Tensor] = {}
        self.pruned_amount = 0.0
        self.pruning_steps: list[int] = []
        self.telemetry: DriftTelemetry | None = None
        self.history: dict[str, list[float]] = {}
        self._measure_now = False
        self._stepped = False  # an optimizer step was taken in this batch (not so within an accumulation window)
        self._regular_step = False  # a log_every_n_steps step (histograms), not only a burst step
        # (step, drift/producer_l2) of every measured step: the transient figures of final_metrics.
        self.drift_trace: list[tuple[int, float]] = []
        self._last_logged_step: int | None = None
        self._rank_fingerprints: list[list[float]] = []
        self._masked: list[tuple[PrunableLayer, Tensor]] = []
        self._mask_images_pending = True  # the channel-mask images change only at pruning events
        self._network: nn.Module | None = None
        self.cut: dict[str, Any] | None = None  # what the cut did (TrainingCut.metrics), once it happened
        self.cut_sizes: dict[str, dict[str, int]] = {}

    def _check_cut_settings(self) -> None:
        for name in ("cut_at_epoch", "cut_at_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"mask.{name} must be a non-negative integer or null, got {value!r}")
        if not isinstance(self.cut_changes_outputs, bool):
            raise ConfigError(f"mask.cut_changes_outputs must be true or false, got {self.cut_changes_outputs!r}")
        if self.cut_at_epoch is not None and self.cut_at_step is not None:
            raise ConfigError(
                f"set mask.cut_at_epoch or mask.cut_at_step, not both (got {self.cut_at_epoch} and {self.cut_at_step})"
            )
        if self.cut_at_epoch is None and self.cut_at_step is None:
            return
        if self.cut_at_step is None:
            setting = f"mask.cut_at_epoch={self.cut_at_epoch}"
        else:
            setting = f"mask.cut_at_step={self.cut_at_step}"
        why = self.strategy.why_cut_changes_outputs
        if why is not None and not self.cut_changes_outputs:
            raise ConfigError(
                f"{setting} with mask={self.strategy_name} would change the network's outputs ({why}); use "
                "mask=activation, or set mask.cut_changes_outputs=true to cut anyway (metrics.json reports the gap)"
            )
        schedule = self.schedule
        last_epoch = schedule.end_epoch if schedule.kind == "gradual" else schedule.at_epoch
        if self.cut_at_epoch is not None and last_epoch is not None and self.cut_at_epoch < last_epoch:
            raise ConfigError(f"{setting} comes before the last pruning epoch {last_epoch}: cut at or after it")
        if self.cut_at_step is not None and schedule.at_step is not None and self.cut_at_step < schedule.at_step:
            raise ConfigError(f"{setting} comes before mask.at_step={schedule.at_step}: cut at or after it")

    # -- setup ------------------------------------------------------------------------------------
    def network(self, pl_module: L.LightningModule) -> nn.Module:
        if self.module_attribute in (None, ""):
            return pl_module
        if self.module_attribute == "auto":
            candidate = getattr(pl_module, "model", None)
            if isinstance(candidate, nn.Module):
                return candidate
            return pl_module if defines_forward(pl_module) else held_network(pl_module)
        candidate = getattr(pl_module, self.module_attribute, None)
        if not isinstance(candidate, nn.Module):
            raise ConfigError(f"mask.module={self.module_attribute!r} is not a submodule of {type(pl_module).__name__}")
        return candidate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every stage: `Trainer.validate/test(ckpt_path=...)` loads weights named as the masked network names them.
        if self._set_up:
            return
        network = self.network(pl_module)
        self._network = network
        cuts = self.cut_at_epoch is not None or self.cut_at_step is not None
        if cuts and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ConfigError(
                f"mask.cut_at_epoch/cut_at_step cannot cut under {type(trainer.strategy).__name__} with "
                f"{trainer.world_size} processes (it shards or holds the parameters it was given); accepted: one "
                "device or strategy=ddp, or cut after training with compact=true"
            )
        # A checkpoint written after a cut holds the smaller network: take its shape before its weights load.
        # The private form, which torch had before 2.5's public register_load_state_dict_pre_hook.
        network._register_load_state_dict_pre_hook(self._take_cut_shape, with_module=True)
        self.spaces = self._choose_spaces(network)
        self.layers = [layer for space in self.spaces for layer in space.producers]
        self.layer_widths = {layer.name: layer.num_channels for layer in self.layers}
        self._set_up = True
        # Before Lightning loads a checkpoint's weights: parametrized names must exist for their keys to load.
        # Before the telemetry: the mask's forward hook is registered first, so it runs before the leak probe.
        for layer in self.layers:
            self.strategy.prepare(layer)
        self.telemetry = DriftTelemetry(self.layers, self.strategy, dict(network.named_modules()))
        self._write_dashboard_layout(trainer)
        log.info("pruning %d channel spaces (%d layers) with mask=%s: %s", len(self.spaces), len(self.layers),
                 self.strategy_name, ", ".join("+".join(space.names) for space in self.spaces))  # fmt: skip

    def _choose_spaces(self, network: nn.Module) -> list[ChannelSpace]:
        """The channel spaces to prune, from the network's channel graph, checked by the criterion."""
        graph = trace_channel_graph(network)
        patterns = self.layer_patterns
        if isinstance(self.importance, Explicit) and patterns is None:
            patterns = self.importance.patterns
        spaces = select_spaces(graph.spaces, patterns, self.groups)
        if not spaces:
            reasons = sorted({reason for space in graph.spaces for reason in space.refusals[:1]})
            coupled = sum(space.coupled and space.prunable for space in graph.spaces)
            raise ConfigError(
                f"{type(network).__name__} has no channel space to prune"
                + (f" outside its {coupled} coupled groups (set mask.groups=true)" if coupled else "")
                + (f"; refused: {'; '.join(reasons[:3])}" if reasons else "")
            )
        self.importance.check(spaces)
        return spaces

    @rank_zero_only
    def _write_dashboard_layout(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(custom_scalars_layout())

    # -- pruning ----------------------------------------------------------------------------------
    def _new_masks(self, target: float) -> dict[str, Tensor]:
        """One mask per space, the same for every producer of it."""
        masks = {}
        for space in self.spaces:
            already = self.pruned.get(space.producers[0].name, torch.zeros(space.width, dtype=torch.bool)).cpu()
            mask = self.importance.select(space, target, already)
            masks.update((layer.name, mask) for layer in space.producers)
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
        if self.cut is not None:
            return  # the pruned channels are gone: nothing left to prune or measure
        target = self.schedule.target(trainer.current_epoch, trainer.global_step)
        if target > self.pruned_amount and self.importance.ready():
            self.prune(trainer, target)
        if self._cut_due(trainer):
            self._cut(trainer, pl_module, batch)
            return
        step = trainer.global_step
        self._regular_step = step % self.log_every_n_steps == 0
        self._measure_now = bool(self.pruned) and (self._regular_step or self.in_burst(step))
        assert self.telemetry is not None
        self.telemetry.arm(self._measure_now and self._regular_step)

    def in_burst(self, step: int) -> bool:
        """Whether the step taken at ``global_step == step`` is among a pruning event's first ``burst_steps``."""
        return any(0 <= step - event < self.burst_steps for event in self.pruning_steps)

    # -- the cut ----------------------------------------------------------------------------------
    def _cut_due(self, trainer: L.Trainer) -> bool:
        if self.cut_at_step is not None:
            return trainer.global_step >= self.cut_at_step
        return self.cut_at_epoch is not None and trainer.current_epoch >= self.cut_at_epoch

    def _cut(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """Cut the pruned channels out of the live network and carry the optimizers over (see
        ``pruneflow.compaction.while_training``): training goes on, on the smaller network."""
        # Imported here: pruneflow.compaction's pipeline imports this module.
        from pruneflow.compaction.cut import compact
        from pruneflow.compaction.while_training import swap_in

        final = 1.0 if self.criterion == EXPLICIT else self.amount
        if self.pruned_amount < final:
            raise ConfigError(
                f"mask.cut_at_epoch/cut_at_step: the cut is due at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}, before pruning finished ({self.pruned_amount:.3g} of {final:.3g} pruned); "
                "cut at or after the last pruning step"
            )
        network = self.network(pl_module)
        compaction = compact(network, self.pruned)  # on a copy: the live network is untouched if it refuses
        images = batch[0] if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) else None
        if images is not None and getattr(pl_module, "channels_last", False) and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        masked_logits = None if images is None else eval_outputs(network, images)
        self._drop_machinery()
        result = swap_in(network, compaction, trainer.optimizers, None if images is None else images[:1])
        rewrap_distributed(trainer)
        self.cut_sizes = result.sizes
        self.cut = result.metrics(trainer.global_step)
        if masked_logits is not None:
            # What the cut changed, on this batch: ~1e-6 for an exact cut, the gap where channels were alive.
            cut_logits = eval_outputs(network, images)
            self.cut["cut/batch_max_abs_diff"] = float((cut_logits - masked_logits).abs().max())
            if masked_logits.ndim == 2:
                agreement = (cut_logits.argmax(1) == masked_logits.argmax(1)).float().mean()
                self.cut["cut/batch_top1_agreement"] = float(agreement)
        log.info(
            "step %d: cut %d of %d channels out of the network (params %d → %d); training goes on without "
            "them, and the telemetry stops: the pruned channels no longer exist",
            trainer.global_step, result.channels[0] - result.channels[1], result.channels[0], *result.params,
        )  # fmt: skip
        self._log_to_loggers(trainer, {key: float(value) for key, value in self.cut.items()}, histograms=False)

    def _drop_machinery(self) -> None:
        """Hooks, parametrizations and telemetry of the masked network, and the callback's references to its
        modules: the cut network has no pruned channels, and the modules it replaced can be freed."""
        for layer in self.layers:
            self.strategy.remove(layer)
        if self.telemetry is not None:
            self.telemetry.remove()
        self.telemetry = None
        self._masked = []
        self._measure_now = False
        self.spaces, self.layers = [], []

    def _take_cut_shape(self, module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str, *_: Any) -> None:
        """Load-state-dict pre-hook of the network: a checkpoint written after a cut holds smaller tensors;
        rebuild the modules at those widths (and drop the masks, which fit no more) before they load."""
        from pruneflow.compaction.while_training import adopt_sizes, sizes_in_state_dict

        sizes = sizes_in_state_dict(module, state_dict, prefix)
        if sizes:
            self._drop_machinery()
            adopt_sizes(module, sizes)
            self.cut_sizes = sizes

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once per optimizer step, with its whole gradient: under gradient accumulation `on_after_backward`
        # runs per micro-batch, on a partial, still accumulating `.grad`.
        self._stepped = True
        if self._measure_now and self.telemetry is not None:
            self.telemetry.record_gradients()  # before any gradient mask
        self.importance.before_optimizer_step(self.layers)
        for layer, mask in self._masked:
            self.strategy.before_optimizer_step(layer, mask)
        if self._measure_now and self.telemetry is not None:
            self.telemetry.snapshot_rows()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return  # a micro-batch of an accumulation window: no optimizer step taken, nothing to measure
        self._stepped = False
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
        # The final state in full (histograms, leak, consumers), unless the last full measurement was of it.
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
            if histograms:  # a full measurement; a burst step measures the kernels and optimizer shares only
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
            "layers": dict(self.layer_widths),
            "pruned": {name: mask.cpu() for name, mask in self.pruned.items()},
            "pruned_amount": self.pruned_amount,
            "pruning_steps": list(self.pruning_steps),
            "consumer_reference": {
                f"{producer}>{consumer}": ref.cpu() for (producer, consumer), ref in references.items()
            },
            "history": {tag: list(values) for tag, values in self.history.items()},
            "drift_trace": [[float(step), value] for step, value in self.drift_trace],
            "last_logged_step": -1 if self._last_logged_step is None else self._last_logged_step,
            **self.importance.state_dict(),
            "cut": dict(self.cut) if self.cut is not None else {},
            "cut_sizes": {name: dict(widths) for name, widths in self.cut_sizes.items()} if self.cut else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Apply a checkpoint's mask state. Lightning calls this after ``setup`` (machinery installed,
        layers chosen) and after loading the weights, whether fitting, validating or testing."""
        if not self._set_up:
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
        if self.layer_widths and state["layers"] != self.layer_widths:
            raise ConfigError(
                f"{origin} pruned layers {state['layers']} but this run's model and mask.layers give "
                f"{self.layer_widths}; it comes from another model"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        self._check_compatible(state, "the checkpoint")
        if state.get("cut"):
            self._restore_cut(state)
            return
        if self.cut_sizes:
            raise ConfigError(
                f"the checkpoint's weights have other widths than the network ({sorted(self.cut_sizes)[:3]}) but "
                "it records no cut: it comes from another model"
            )
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
        self.importance.load_state_dict(state)
        self._refresh_masked()

    def _restore_cut(self, state: dict[str, Any]) -> None:
        """A checkpoint written after the cut: the network has the cut widths (the weights' pre-hook took them;
        ``adopt_sizes`` only checks here) and the masks stay history."""
        from pruneflow.compaction.while_training import adopt_sizes

        assert self._network is not None
        self._drop_machinery()
        adopt_sizes(self._network, state["cut_sizes"])
        self.cut_sizes = {name: dict(widths) for name, widths in state["cut_sizes"].items()}
        self.cut = dict(state["cut"])
        self.pruned = {name: mask.clone() for name, mask in state["pruned"].items()}
        self.pruned_amount = float(state["pruned_amount"])
        self.pruning_steps = list(state["pruning_steps"])
        self.history = {tag: list(values) for tag, values in state["history"].items()}
        self._last_logged_step = None if state["last_logged_step"] < 0 else int(state["last_logged_step"])

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
        if self.cut is not None:
            report.update(self.cut)
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


def rewrap_distributed(trainer: L.Trainer) -> None:
    """DDP reduces the gradients of the parameters it was built over: after a cut, wrap the network anew,
    as the strategy first did (its DDP arguments and communication hooks), so the cut parameters are the
    ones reduced. Every rank cuts the same channels at the same step (the masks are rank 0's), and the new
    wrapper's construction broadcasts rank 0's weights, which are already equal on every rank."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
        log.info("the cut network is wrapped anew in DistributedDataParallel on rank %d", trainer.global_rank)
