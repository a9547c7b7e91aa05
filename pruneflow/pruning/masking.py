"""The masking lifecycle of the chosen channel spaces: the strategy's machinery installed at setup with
nothing pruned, masks chosen and applied at each pruning event (one mask per space, the same for every
producer of it), the strategy's calls around every optimizer step, the machinery removed at a cut, and the
masks a checkpoint carries."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, PrunableLayer
from pruneflow.graph.layers import kernel_row_mask
from pruneflow.pruning.criteria import Criterion
from pruneflow.pruning.strategies import MaskStrategy, current_strategy_name, zero_optimizer_state

log = logging.getLogger(__name__)


class Masking:
    """Masks of the chosen spaces under ``strategy``; ``reset_optimizer_state`` zeroes the optimizer state
    (momentum, Adam moments) of pruned entries at each pruning event and after every step."""

    def __init__(self, strategy: MaskStrategy, reset_optimizer_state: bool) -> None:
        if not isinstance(reset_optimizer_state, bool):
            raise ConfigError(f"mask.reset_optimizer_state must be true or false, got {reset_optimizer_state!r}")
        self.strategy = strategy
        self.reset_optimizer_state = reset_optimizer_state
        # The chosen spaces and their producers (modules of the masked network); emptied by a cut, which
        # replaces those modules, so that nothing here holds a full-size copy of them.
        self.spaces: list[ChannelSpace] = []
        self.layers: list[PrunableLayer] = []
        self.widths: dict[str, int] = {}  # each chosen producer's width at setup: checkpoints compare it
        self.pruned: dict[str, Tensor] = {}
        self.pruned_amount = 0.0
        self.pruning_steps: list[int] = []
        # (layer, mask) of the layers with pruned channels, decided on the host at each pruning event, so
        # per-step hooks never ask the device `mask.any()`.
        self.masked: list[tuple[PrunableLayer, Tensor]] = []

    def acts_every_step(self, criterion: Criterion) -> bool:
        """Whether the strategy (gradient masks, re-zeroing), ``criterion`` (gathering gradients) or the
        optimizer-state reset act around every optimizer step, measured or not."""
        strategy = type(self.strategy)
        return (
            self.reset_optimizer_state
            or strategy.before_optimizer_step is not MaskStrategy.before_optimizer_step
            or strategy.after_optimizer_step is not MaskStrategy.after_optimizer_step
            or type(criterion).before_optimizer_step is not Criterion.before_optimizer_step
        )

    def install(self, spaces: Sequence[ChannelSpace]) -> None:
        """The forward-pass machinery on every producer of ``spaces``, nothing pruned: parameter and buffer
        names are then the same before and after pruning, so a checkpoint's weights load by name."""
        self.spaces = list(spaces)
        self.layers = [layer for space in spaces for layer in space.producers]
        self.widths = {layer.name: layer.num_channels for layer in self.layers}
        for layer in self.layers:
            self.strategy.prepare(layer)

    def select(
        self, criterion: Criterion, target: float, amounts: Mapping[str, float] | None = None
    ) -> dict[str, Tensor]:
        """One mask per space up to ``target`` (or its own amount in ``amounts``, by space name), keeping earlier
        choices, the same for each of its producers."""
        masks = {}
        for space in self.spaces:
            already = self.pruned.get(space.producers[0].name, torch.zeros(space.width, dtype=torch.bool)).cpu()
            amount = target if amounts is None else amounts.get(space.name, target)
            mask = criterion.select(space, amount, already)
            masks.update((layer.name, mask) for layer in space.producers)
        return masks

    def apply(self, masks: Mapping[str, Tensor], target: float, step: int, optimizers: Iterable[Any]) -> None:
        """A pruning event: the strategy applies ``masks`` (zeroing kernels where it does)."""
        for layer in self.layers:
            mask = masks[layer.name].to(layer.producer.weight.device)
            self.pruned[layer.name] = mask
            if bool(mask.any()):
                self.strategy.apply(layer, mask)
        self._refresh()
        self.pruned_amount = target
        self.pruning_steps.append(step)
        if self.reset_optimizer_state:
            self.zero_optimizer_state(optimizers)

    def before_optimizer_step(self) -> None:
        for layer, mask in self.masked:
            self.strategy.before_optimizer_step(layer, mask)

    def after_optimizer_step(self, optimizers: Iterable[Any]) -> None:
        for layer, mask in self.masked:
            self.strategy.after_optimizer_step(layer, mask)
        if self.reset_optimizer_state:
            self.zero_optimizer_state(optimizers)

    def zero_optimizer_state(self, optimizers: Iterable[Any]) -> None:
        for optimizer in optimizers:
            for layer, mask in self.masked:
                rows = kernel_row_mask(layer.producer, mask)
                zero_optimizer_state(optimizer, self.strategy.trainable_tensors(layer), rows)

    def remove(self) -> None:
        """The strategy's hooks and parametrizations, and every reference to the masked modules (a cut
        replaces them: the full-size modules can be freed). The masks stay, as history."""
        for layer in self.layers:
            self.strategy.remove(layer)
        self.masked, self.spaces, self.layers = [], [], []

    def _refresh(self) -> None:
        self.masked = [(layer, mask) for layer in self.layers
                       if (mask := self.pruned.get(layer.name)) is not None and bool(mask.any())]  # fmt: skip

    # -- checkpointing ----------------------------------------------------------------------------
    def check_compatible(self, state: Mapping[str, Any], origin: str) -> None:
        """Refuse, in one line, the state of a run pruned by another strategy or of another model."""
        saved = current_strategy_name(state["strategy"], warn=False)  # a checkpoint may hold a former name
        if saved != self.strategy.name:
            raise ConfigError(
                f"{origin} was pruned with mask={saved} but this run has mask={self.strategy.name}; "
                f"resume with mask={saved} or start a new run"
            )
        if self.widths and state["layers"] != self.widths:
            raise ConfigError(
                f"{origin} pruned layers {state['layers']} but this run's model and mask.layers give "
                f"{self.widths}; it comes from another model"
            )

    def reached(self, final: float) -> bool:
        """Whether the last pruning event (to the schedule's ``final`` amount) has happened."""
        return bool(self.pruning_steps) and self.pruned_amount >= final

    def report(self) -> dict[str, Any]:
        """What was pruned, when and how (``metrics.json``'s ``mask/*``)."""
        return {
            "mask/strategy": self.strategy.name,
            "mask/reset_optimizer_state": self.reset_optimizer_state,
            "mask/pruning_steps": list(self.pruning_steps),
            "mask/pruned_channels": {name: int(mask.sum()) for name, mask in self.pruned.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "reset_optimizer_state": self.reset_optimizer_state,
            "layers": dict(self.widths),
            "pruned": {name: mask.cpu() for name, mask in self.pruned.items()},
            "pruned_amount": self.pruned_amount,
            "pruning_steps": list(self.pruning_steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The events and masks; the strategy installs the masks where layers are left (not after a cut)."""
        by_name = {layer.name: layer for layer in self.layers}
        self.pruned = {}
        for name, mask in state["pruned"].items():
            layer = by_name.get(name)
            self.pruned[name] = mask.clone() if layer is None else mask.to(layer.producer.weight.device)
            if layer is not None and bool(mask.any()):
                self.strategy.install(layer, self.pruned[name])
        self.pruned_amount = float(state["pruned_amount"])
        self.pruning_steps = list(state["pruning_steps"])
        self._refresh()
