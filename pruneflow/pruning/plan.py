"""The pruning plan: which channel spaces to prune, when, how much, by which criterion, and when to cut —
every setting checked against the others before training.

The schedule says when a pruning event is due; the criterion may need optimizer steps of its own before it
can select (``Criterion.steps_to_select``: Taylor gathers ``taylor_batches`` gradients first), so the real
last pruning step is the schedule's last event plus those. A cut (``cut_at_epoch`` / ``cut_at_step``) must
come at or after it. Settings in one unit are compared in ``__init__``; a step against an epoch once the
epoch's length in optimizer steps is known (``check_cut(steps_per_epoch)``, at the start of training),
still before the first step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.pruning.criteria import EXPLICIT, Criterion, Explicit
from pruneflow.pruning.selection import select_spaces
from pruneflow.pruning.sparsity_schedule import PruningSchedule
from pruneflow.pruning.strategies import MaskStrategy


@dataclass(frozen=True)
class Point:
    """``step`` optimizer steps into epoch ``epoch``; ``epoch`` None: ``step`` is a global step."""

    step: int
    epoch: int | None = None

    def global_step(self, steps_per_epoch: int | None) -> int | None:
        if not self.epoch:
            return self.step
        return None if steps_per_epoch is None else self.epoch * steps_per_epoch + self.step


def steps_per_epoch(trainer: L.Trainer) -> int | None:
    """Optimizer steps per training epoch (an incomplete accumulation window steps at the epoch's end)."""
    batches = trainer.num_training_batches
    return None if math.isinf(batches) else math.ceil(batches / trainer.accumulate_grad_batches)


class PruningPlan:
    """What to prune when: ``choose_spaces`` the channel spaces (``layers`` globs, coupled ``groups``), ``due``
    the target of a pruning event, ``cut_due`` the cut.

    ``timing``: ``PruningSchedule``'s arguments but the amount (``kind``, ``at_epoch``, ``at_step``, ...).
    """

    def __init__(
        self,
        criterion: Criterion,
        amount: float | None,
        layers: Sequence[str] | None,
        groups: bool,
        timing: Mapping[str, Any],
        *,
        cut_at_epoch: int | None,
        cut_at_step: int | None,
        strategy: MaskStrategy,
        cut_changes_outputs: bool,
        heads: bool = False,
        target: str | None = None,
    ) -> None:
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, (int, float))
                                   or not 0.0 <= amount < 1.0):  # fmt: skip
            raise ConfigError(f"mask.amount must be a fraction in [0, 1), got {amount!r}")
        if not isinstance(groups, bool):
            raise ConfigError(f"mask.groups must be true or false, got {groups!r}")
        self.layer_patterns = list(layers) if layers is not None else None
        self.groups = groups
        if not isinstance(heads, bool):
            raise ConfigError(f"mask.heads must be true or false, got {heads!r}")
        self.heads = heads
        self.compacts = False  # compact=true: the trained network is cut after fitting (set by the run)
        self.criterion, self.amount = criterion, None if amount is None else float(amount)
        # explicit lists, and a budget (amount None: mask.target), carry their own counts: the schedule only says
        # when, and how far along (a target of 1 = "all of it, now").
        self.final = 1.0 if criterion.name == EXPLICIT or self.amount is None else self.amount
        self.schedule = PruningSchedule(self.final, **timing)  # kind, at_epoch, at_step, start_epoch, end_epoch
        self.cut_at_epoch, self.cut_at_step = cut_at_epoch, cut_at_step
        for name in ("cut_at_epoch", "cut_at_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"mask.{name} must be a non-negative integer or null, got {value!r}")
        if not isinstance(cut_changes_outputs, bool):
            raise ConfigError(f"mask.cut_changes_outputs must be true or false, got {cut_changes_outputs!r}")
        if cut_at_epoch is not None and cut_at_step is not None:
            raise ConfigError(
                f"set mask.cut_at_epoch or mask.cut_at_step, not both (got {cut_at_epoch} and {cut_at_step})"
            )
        if self.cuts and strategy.why_cut_changes_outputs is not None and not cut_changes_outputs:
            raise ConfigError(
                f"{self._cut_setting()} with mask={strategy.name} would change the network's outputs "
                f"({strategy.why_cut_changes_outputs}); use mask=activation, or set mask.cut_changes_outputs=true "
                "to cut anyway (metrics.json reports the gap)"
            )
        self.check_cut()

    @property
    def cuts(self) -> bool:
        return self.cut_at_epoch is not None or self.cut_at_step is not None

    def due(self, epoch: int, step: int, pruned_amount: float) -> float | None:
        """The target of a pruning event due now, once the criterion can select; else None."""
        target = self.schedule.target(epoch, step)
        return target if target > pruned_amount and self.criterion.ready() else None

    def cut_due(self, epoch: int, step: int) -> bool:
        if self.cut_at_step is not None:
            return step >= self.cut_at_step
        return self.cut_at_epoch is not None and epoch >= self.cut_at_epoch

    def choose_spaces(self, network: nn.Module) -> list[ChannelSpace]:
        """The channel spaces to prune, from the network's channel graph, checked by the criterion."""
        graph = trace_channel_graph(network)
        patterns = self.layer_patterns
        if isinstance(self.criterion, Explicit) and patterns is None:
            patterns = self.criterion.patterns
        spaces = select_spaces(graph.spaces, patterns, self.groups, self.heads)
        if not spaces:
            reasons = sorted({reason for space in graph.spaces for reason in space.refusals[:1]})
            coupled = sum(space.coupled and space.prunable for space in graph.spaces)
            raise ConfigError(
                f"{type(network).__name__} has no channel space to prune"
                + (f" outside its {coupled} coupled groups (set mask.groups=true)" if coupled else "")
                + (f"; refused: {'; '.join(reasons[:3])}" if reasons else "")
            )
        self.check_heads_cut(spaces)
        self.criterion.bind(network)
        self.criterion.check(spaces)
        return spaces

    def check_heads_cut(self, spaces: Sequence[ChannelSpace]) -> None:
        """Refuse, before training, whole heads that no cut can take out: an attention whose head width follows its
        input's (torchvision's Swin and MaxViT, timm's BEiT, EVA and CaiT, torch's ``nn.MultiheadAttention``:
        ``tied_to``) keeps its head count in a cut (a target is met by a cut too)."""
        cut = self.cuts or self.compacts or self.amount is None
        tied = [space.name for space in spaces if space.heads > 1 and space.tied_to is not None]
        if self.heads and cut and tied:
            raise ConfigError(
                f"mask.heads=true cannot cut the whole heads of {tied[0]}: torchvision's Swin and MaxViT attentions, "
                "timm's BEiT, EVA and CaiT attentions and torch's nn.MultiheadAttention (torchvision's ViT) take their "
                "head width from their input's, so they keep their head count; whole heads are cut from "
                "timm's Attention (ViT, DeiT) only. For these, evaluate the masked network: mask.amount, no "
                "mask.target, mask.cut_at_epoch, mask.cut_at_step or compact=true"
            )

    # -- the cut against the last pruning step ------------------------------------------------------
    @property
    def last_pruning(self) -> Point:
        delay = self.criterion.steps_to_select
        schedule = self.schedule
        if schedule.kind == "gradual":
            return Point(delay, schedule.end_epoch)
        if schedule.at_step is not None:
            return Point(schedule.at_step + delay)
        return Point(delay, schedule.at_epoch or 0)

    def check_cut(self, steps_per_epoch: int | None = None) -> None:
        """Refuse a cut before the last pruning step; without ``steps_per_epoch``, what one unit compares."""
        if not self.cuts:
            return
        last = self.last_pruning
        cut = Point(self.cut_at_step) if self.cut_at_step is not None else Point(0, self.cut_at_epoch)
        setting = self._cut_setting()
        if cut.epoch is not None and last.epoch is not None:
            if cut.epoch < last.epoch:
                raise ConfigError(f"{setting} comes before the last pruning epoch {last.epoch}: cut at or after it")
            if cut.epoch == last.epoch and last.step > 0:
                raise ConfigError(
                    f"{setting} comes before the last pruning step: mask.criterion={self.criterion.name} selects "
                    f"{last.step} optimizer steps into epoch {last.epoch}; cut at a later epoch"
                )
        cut_step, last_step = cut.global_step(steps_per_epoch), last.global_step(steps_per_epoch)
        if cut_step is not None and last_step is not None and cut_step < last_step:
            where = f" (step {cut_step})" if cut.epoch is not None else ""
            raise ConfigError(
                f"{setting}{where} comes before {self._describe(last, last_step, steps_per_epoch)}: cut at or after it"
            )

    def _describe(self, last: Point, step: int, steps_per_epoch: int | None) -> str:
        delay = self.criterion.steps_to_select
        gathering = f" + {delay} optimizer steps over which mask.criterion={self.criterion.name} gathers gradients"
        if last.epoch is None:
            at_step = f"mask.at_step={self.schedule.at_step}"
            return at_step if not delay else f"the last pruning step {step} ({at_step}{gathering})"
        start = "the first step" if not last.epoch else f"epoch {last.epoch} of {steps_per_epoch} optimizer steps"
        return f"the last pruning step {step} ({start}{gathering if delay else ''})"

    def _cut_setting(self) -> str:
        if self.cut_at_step is not None:
            return f"mask.cut_at_step={self.cut_at_step}"
        return f"mask.cut_at_epoch={self.cut_at_epoch}"
