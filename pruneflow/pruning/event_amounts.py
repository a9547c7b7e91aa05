"""How much each pruning event removes from each space: one ``mask.amount`` everywhere, the ``mask.amounts`` fixed by
hand, or a ``mask.target``'s allocation from the global ranking (``budget.Budget``) — and the settings check that
picks between them. The pruning callback asks it once per event (``EventAmounts.at``); it owns the budget's wiring:
the cost model built at setup (or at the first event, from its batch, when no input shape is known before), the
latency calibration on the run's device and the logged allocation."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch import Tensor, nn

from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace
from pruneflow.pruning.budget import Budget, example_image, log_allocation
from pruneflow.pruning.criteria import Criterion

log = logging.getLogger(__name__)

DEFAULT_AMOUNT = 0.5  # mask.amount when neither it nor mask.target is set


class EventAmounts:
    """The amounts' settings (``mask.*``):

    amount: fraction of channels removed per pruned channel space, in [0, 1); never all of one. Default
        ``DEFAULT_AMOUNT``, unless ``target`` is set (not both).
    target: ``flops:2.0``, ``params:2.0`` or ``latency:2.0`` (on the run's device): per-space amounts from one global
        ranking that make the cut network that many times smaller (``budget.Budget``).
    max_amount: with ``target``: no space loses more than this fraction.
    amounts: ``{glob: fraction}``: spaces fixed by hand (with ``target`` left out of the ranking; without, instead
        of ``amount``); each at most ``max_amount``.
    round_to: with ``target``: kept widths are multiples of this.
    cost_weight: with ``target``: the ranking divides importance by relative cost to this power.
    """

    def __init__(
        self,
        amount: float | None,
        target: str | None,
        max_amount: float = 0.9,
        amounts: Mapping[str, float] | None = None,
        round_to: int = 1,
        cost_weight: float = 1.0,
    ) -> None:
        if target is not None and amount is not None:
            raise ConfigError(
                f"set mask.target or mask.amount, not both (got target={target}, amount={amount}): a target chooses "
                "each space's amount"
            )
        self.budget = Budget(target, max_amount, amounts, round_to, cost_weight)
        self.amount = DEFAULT_AMOUNT if target is None and amount is None else amount
        self._network: nn.Module | None = None

    def setup(
        self, trainer: L.Trainer, pl_module: L.LightningModule, network: nn.Module, spaces: Sequence[ChannelSpace]
    ) -> None:
        """Check the fixed amounts' globs, and build the cost model when an input shape is known (else at the first
        pruning event, from its batch): an unreachable target is refused before training."""
        self._network = network
        image = example_image(trainer, pl_module, network)
        if image is not None or self.budget.target is None:
            self.budget.prepare(network, spaces, image)

    def at(
        self,
        trainer: L.Trainer,
        criterion: Criterion,
        spaces: Sequence[ChannelSpace],
        pruned: Mapping[str, Tensor],
        progress: float,
        batch: Any = None,
    ) -> dict[str, float] | None:
        """Per-space amounts of a pruning event ``progress`` of the way to the final amount (a schedule's share):
        the budget's allocation (logged), or the amounts fixed by hand; None: the schedule's amount everywhere.
        ``pruned``: each producer's mask so far (a gradual schedule keeps earlier choices)."""
        budget = self.budget
        if budget.target is None:
            return {name: amount * progress for name, amount in budget.fixed_amounts(spaces).items()} or None
        assert self._network is not None, "EventAmounts.setup runs first"
        if budget.model is None:  # no input shape at setup: the cost model reads this batch's first image
            budget.prepare(self._network, spaces, example_image(trainer, None, self._network, batch))
        already = {space.name: pruned[space.producers[0].name] for space in spaces
                   if space.producers[0].name in pruned}  # fmt: skip
        if budget.target.metric == "latency":  # timed on the run's device, under its precision
            settings = {"device": next(self._network.parameters()).device, "precision": str(trainer.precision)}
            allocation = budget.calibrate_latency(self._network, criterion, spaces, already, progress, settings)
        else:
            allocation = budget.allocate(criterion, spaces, already, progress)
        log_allocation(trainer, allocation)
        return allocation.amounts
