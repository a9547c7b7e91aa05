"""ChannelPruning: the Lightning Callback that masks channels by strategy and logs drift telemetry.

It works on any LightningModule: it prunes the channel spaces of ``pl_module.<module>`` (default: the
module's ``model`` attribute when it has one, else the LightningModule itself, else — when the
LightningModule defines no ``forward`` — the one submodule with weights it holds), read from the
channel graph (``pruneflow.graph.trace_channel_graph``). The callback only wires Lightning's hooks to objects
with one job each: the plan (``plan.PruningPlan``: what to prune when, and when to cut), the masking
lifecycle (``masking.Masking``), the telemetry writer (``telemetry_writer.TelemetryWriter``) and the cut
(``live_cut.LiveCut``); each carries its own part of the checkpointed state. Per training step (hook
order in Lightning's automatic optimization):

    on_train_batch_start     prune when the plan says so; cut the pruned channels out at
                             ``cut_at_epoch`` / ``cut_at_step``; plan the step's telemetry
    forward / backward       (every micro-batch of an accumulation window)
    on_before_optimizer_step once per optimizer step, with its whole gradient: gradient telemetry and
                             the criterion's gradients (before any gradient mask), then
                             strategy.before_optimizer_step (gradient masking); on measured steps a
                             copy of the pruned rows
    optimizer.step
    on_train_batch_end       after an optimizer step only: on measured steps the optimizer's share of
                             the step; then strategy.after_optimizer_step (re-zeroing), optimizer-state
                             reset, telemetry logged

The last two are hidden from Lightning's loop on a step where neither has anything to do: not measured, and
a strategy and criterion that do nothing around an optimizer step (``activation`` with ``l1``, say) — each live
hook costs the loop about fifteen Python calls a step (``callbacks.step_hooks``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from pruneflow.callbacks.step_hooks import show_step_hooks
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, PrunableLayer
from pruneflow.pruning.budget import Budget
from pruneflow.pruning.criteria import Criterion
from pruneflow.pruning.event_amounts import EventAmounts
from pruneflow.pruning.importance import make_importance
from pruneflow.pruning.live_cut import LiveCut
from pruneflow.pruning.masking import Masking
from pruneflow.pruning.plan import PruningPlan
from pruneflow.pruning.pruned_network import find_network
from pruneflow.pruning.sparsity import make_sparse_training
from pruneflow.pruning.strategies import MaskStrategy, current_strategy_name, make_strategy, warn_static_masks
from pruneflow.pruning.telemetry import DriftTelemetry
from pruneflow.pruning.telemetry_writer import TelemetryWriter

log = logging.getLogger(__name__)

OPTIMIZER_STEP_HOOKS = ("on_before_optimizer_step", "on_train_batch_end")


class ChannelPruning(Callback):
    """Prune channel spaces (convs' and linear layers' outputs) with a masking ``strategy`` and measure
    whether they stay pruned.

    Args:
        strategy: one of ``control`` (select and measure, mask nothing), ``weight``, ``activation``,
            ``gradient``, ``parametrize``, ``hard``.
        amount, target, max_amount, amounts, round_to, cost_weight: how much each space loses — one fraction
            (default 0.5), or a ``target`` such as ``flops:2.0`` met by a global ranking (``event_amounts``).
        criterion: ``l1``, ``l2``, ``random``, ``bn_gamma``, ``taylor``, ``fpgm``, ``lamp`` or ``explicit`` (use
            ``channels``).
        group_reduction: ``producers`` (each criterion's own reading of a group) or ``mean``, ``sum``, ``max`` over
            every member of the group, producers and consumers (``importance``).
        regularizer, regularizer_strength, regularizer_epochs: sparse training (``sparsity``).
        layers: module-name globs of producers (convs, linear layers) whose channel spaces are pruned;
            a glob naming one member of a group selects the whole group. Default: every prunable
            space (coupled groups only with ``groups``).
        groups: include coupled groups (residual additions, squeeze-and-excitation products) in the
            default selection and allow globs to select them.
        heads: attentions lose whole heads (``selection.select_spaces``); cut from timm's ``Attention``, masked only
            in torchvision's Swin and MaxViT (their head width follows the stream).
        channels: for ``explicit``: ``{module name: [channel indices]}``.
        schedule, at_epoch, at_step, start_epoch, end_epoch: see ``PruningSchedule``.
        reset_optimizer_state: zero the optimizer state (momentum, Adam moments) of pruned entries at
            pruning time and after every step.
        log_every_n_steps: telemetry interval in optimizer steps.
        burst_steps: telemetry every step for this many optimizer steps after each pruning event
            (0: no burst).
        taylor_batches: for ``taylor``: optimizer steps whose |w·∂L/∂w| is summed before selecting.
        seed: for ``random``.
        module: attribute of the LightningModule holding the network (``"auto"``: ``model`` if present,
            else the module itself, else — without a ``forward`` — the one submodule with weights).
        cut_at_epoch, cut_at_step: cut the pruned channels out of the network at the start of this
            epoch (or at this global step), inside the running fit, and train on the smaller network
            from then on (see ``live_cut``); at or after the last pruning step. None: never.
        cut_changes_outputs: allow the cut for strategies that leave pruned channels alive (all but
            ``activation``), which changes the network's outputs; ``metrics.json`` reports the gap.
        static_masks: deprecated and ignored (``strategies.warn_static_masks``).

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
        amount: float | None = None,
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
        target: str | None = None,
        max_amount: float = 0.9,
        amounts: Mapping[str, float] | None = None,
        round_to: int = 1,
        cost_weight: float = 1.0,
        group_reduction: str = "producers",
        regularizer: str | None = None,
        regularizer_strength: float = 1e-4,
        regularizer_epochs: int | None = None,
        heads: bool = False,
    ) -> None:
        self.strategy_name = current_strategy_name(strategy)
        self.strategy: MaskStrategy = make_strategy(self.strategy_name)
        self.criterion: Criterion = make_importance(criterion, group_reduction, channels, taylor_batches, seed)
        self.amounts = EventAmounts(amount, target, max_amount, amounts, round_to, cost_weight)
        self.criterion.whole_heads = heads
        self.sparsity = make_sparse_training(regularizer, regularizer_strength, regularizer_epochs)
        timing = {"kind": schedule, "at_epoch": at_epoch, "at_step": at_step, "start_epoch": start_epoch,
                  "end_epoch": end_epoch}  # fmt: skip
        self.plan = PruningPlan(
            self.criterion, self.amounts.amount, layers, groups, timing, cut_at_epoch=cut_at_epoch,
            cut_at_step=cut_at_step, strategy=self.strategy, cut_changes_outputs=cut_changes_outputs, heads=heads,
            target=target,
        )  # fmt: skip
        self.masking = Masking(self.strategy, reset_optimizer_state)
        self.writer = TelemetryWriter(self.strategy, log_every_n_steps, burst_steps)
        self.live_cut = LiveCut()
        self.module_attribute = module
        warn_static_masks(static_masks)
        self._set_up = False
        self._stepped = False  # an optimizer step was taken in this batch (not so within an accumulation window)
        self._network: nn.Module | None = None
        # Whether something acts around every optimizer step, measured or not (else its hooks are hidden).
        self._acts_every_step = self.masking.acts_every_step(self.criterion) or self.sparsity is not None

    # -- what it holds, for readers (the compaction pipeline, reports, tests) -----------------------
    @property
    def pruned(self) -> dict[str, Tensor]:
        """Each chosen producer's mask (True = pruned)."""
        return self.masking.pruned

    @property
    def pruning_steps(self) -> list[int]:
        return self.masking.pruning_steps

    @property
    def spaces(self) -> list[ChannelSpace]:
        return self.masking.spaces

    @property
    def layers(self) -> list[PrunableLayer]:
        return self.masking.layers

    @property
    def layer_widths(self) -> dict[str, int]:
        return self.masking.widths

    @property
    def budget(self) -> Budget:
        return self.amounts.budget

    @property
    def telemetry(self) -> DriftTelemetry | None:
        return self.writer.telemetry

    @property
    def history(self) -> dict[str, list[float]]:
        return self.writer.history

    @property
    def drift_trace(self) -> list[tuple[int, float]]:
        return self.writer.drift_trace

    @property
    def cut(self) -> dict[str, Any] | None:
        """What the cut while training did (its ``cut/*`` metrics), once it happened; else None."""
        return self.live_cut.report

    # -- setup ------------------------------------------------------------------------------------
    def network(self, pl_module: L.LightningModule) -> nn.Module:
        return find_network(pl_module, self.module_attribute)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every stage: `Trainer.validate/test(ckpt_path=...)` loads weights named as the masked network names them.
        if self._set_up:
            return
        network = self._network = self.network(pl_module)
        if self.plan.cuts:
            LiveCut.check_setup(trainer)
        self.live_cut.watch_loads(trainer, network, self.state_key, self._remove_masks)
        # Before Lightning loads a checkpoint's weights: parametrized names must exist for their keys to load.
        # Before the telemetry: the mask's forward hook is registered first, so it runs before the leak probe.
        spaces = self.plan.choose_spaces(network)
        self.amounts.setup(trainer, pl_module, network, spaces)
        self.masking.install(spaces)
        if self.sparsity is not None:
            self.sparsity.bind(network, spaces)
        self.writer.attach(self.masking.layers, dict(network.named_modules()))
        self._set_up = True
        self.writer.write_layout(trainer)
        log.info("pruning %d channel spaces (%d layers) with mask=%s: %s", len(self.spaces), len(self.layers),
                 self.strategy_name, ", ".join("+".join(space.names) for space in self.spaces))  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan.cuts and self.cut is None:
            LiveCut.check_start(trainer, self.plan)

    # -- pruning and the cut ----------------------------------------------------------------------
    def prune(self, trainer: L.Trainer, target: float, batch: Any = None) -> None:
        """One pruning event: select up to ``target``, apply the strategy, snapshot references, reset state."""
        # Rank 0 decides and every rank applies the same masks (scores could differ in the last bit).
        amounts = self.amounts.at(trainer, self.criterion, self.spaces, self.pruned, target / self.plan.final, batch)
        masks = trainer.strategy.broadcast(self.masking.select(self.criterion, target, amounts), src=0)
        self.masking.apply(masks, target, trainer.global_step, trainer.optimizers)
        # Consumer references once every layer is pruned: a consumer that is itself a pruned producer has
        # its own kernels zeroed by then, and that is pruning, not drift.
        self.writer.on_masks(self.masking.masked, pruned_now=True)
        counts = {name: int(mask.sum()) for name, mask in self.pruned.items()}
        log.info("step %d: pruned %s (mask=%s, criterion=%s)", trainer.global_step, counts, self.strategy_name,
                 self.criterion.name)  # fmt: skip

    def _remove_masks(self) -> None:
        """The masking machinery and the telemetry, and every reference to the masked modules: a cut network
        has no pruned channels, and the modules it replaced can be freed."""
        self.masking.remove()
        self.writer.detach()

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._plan_batch(trainer, pl_module, batch)
        step_work = self.cut is None and (self._acts_every_step or self.writer.measuring)
        show_step_hooks(self, OPTIMIZER_STEP_HOOKS, step_work)

    def _plan_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        if self.cut is not None:
            return  # the pruned channels are gone: nothing left to prune or measure
        target = self.plan.due(trainer.current_epoch, trainer.global_step, self.masking.pruned_amount)
        if target is not None:
            self.prune(trainer, target, batch)
        if self.plan.cut_due(trainer.current_epoch, trainer.global_step):
            network = self.network(pl_module)
            report = self.live_cut.cut(trainer, pl_module, network, self.masking, self.plan.final, batch,
                                       self._remove_masks)  # fmt: skip
            self.writer.to_loggers(trainer, report, [], False)
            return
        self.writer.plan_step(trainer.global_step, bool(self.pruned), self.pruning_steps)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once per optimizer step, with its whole gradient: under gradient accumulation `on_after_backward`
        # runs per micro-batch, on a partial, still accumulating `.grad`.
        self._stepped = True
        self.writer.record_gradients()  # before any gradient mask
        self.criterion.before_optimizer_step(self.layers)
        if self._regularizing(trainer):  # after the criterion (it reads the task's gradient), before gradient masks
            self.sparsity.add_gradients()  # type: ignore[union-attr]
        self.masking.before_optimizer_step()
        self.writer.snapshot_rows()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return  # a micro-batch of an accumulation window: no optimizer step taken, nothing to measure
        self._stepped = False
        self.writer.record_optimizer_step(trainer.optimizers)
        self.masking.after_optimizer_step(trainer.optimizers)
        self.writer.write_step(trainer, self.masking.masked)
        if self._regularizing(trainer) and trainer.global_step % self.writer.log_every_n_steps == 0:
            self.sparsity.log(trainer)  # type: ignore[union-attr]

    def _regularizing(self, trainer: L.Trainer) -> bool:
        """Whether sparse training acts now: set, not cut yet, within its epochs (or before the last pruning)."""
        return (self.sparsity is not None and self.cut is None
                and self.sparsity.active(trainer.current_epoch, self.masking.reached(self.plan.final)))  # fmt: skip

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # One fixed batch (the unshuffled validation set's first) per validation epoch; not the sanity check.
        if self.pruned and batch_idx == 0 and dataloader_idx == 0:
            self.writer.arm_eval(not trainer.sanity_checking)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.writer.write_eval_leak(trainer, self.masking.masked)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.writer.write_final(trainer, self.masking.masked, self.pruned)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """All a resumed run needs to continue exactly, each part from its owner: plain tensors, numbers and
        strings only, so the checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "criterion": self.criterion.name,
            "amount": self.plan.amount,
            **self.masking.state_dict(),
            **self.writer.state_dict(),
            **self.criterion.state_dict(),
            **self.live_cut.state_dict(),
            **self.budget.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Apply a checkpoint's state. Lightning calls this after ``setup`` (machinery installed, layers
        chosen) and after loading the weights, whether fitting, validating or testing."""
        if not self._set_up:
            raise RuntimeError(
                "ChannelPruning.load_state_dict needs the layers chosen in setup; restore a checkpoint through "
                "Trainer.fit/validate/test(ckpt_path=...), which calls setup first"
            )
        self.masking.check_compatible(state_dict, "the checkpoint")
        if state_dict.get("cut"):  # written after the cut: the masks stay history
            assert self._network is not None
            self._remove_masks()
            self.live_cut.load_state_dict(state_dict, self._network)
        self.masking.load_state_dict(state_dict)
        if self.telemetry is not None:
            self.writer.on_masks(self.masking.masked, pruned_now=False)
        self.writer.load_state_dict(state_dict, self.layers)
        self.criterion.load_state_dict(state_dict)
        self.budget.load_state_dict(state_dict)

    def check_checkpoint(self, checkpoint: Mapping[str, Any], origin: str) -> None:
        """Refuse in one line, before any weight loads, a checkpoint not pruned or pruned by another strategy.

        Optional: ``load_state_dict`` checks the same, but only after Lightning has loaded the weights,
        which a ``parametrize`` checkpoint's renamed weights would already have failed.
        """
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None:
            raise ConfigError(f"checkpoint {origin} holds no {self.state_key} state: it was not a pruning run")
        self.masking.check_compatible(state, origin)

    # -- reporting --------------------------------------------------------------------------------
    def final_metrics(self) -> dict[str, Any]:
        """Final and max-since-pruning of every telemetry tag, with what was pruned, when and how."""
        report: dict[str, Any] = {"mask/criterion": self.criterion.name, "mask/amount": self.plan.amount}
        report.update(self.masking.report())
        report["mask/rank_fingerprints"] = self.writer.rank_fingerprints
        report.update(self.budget.report())
        report.update(self.cut or {})
        report.update(self.writer.report(self.pruning_steps))
        return report
