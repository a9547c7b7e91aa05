"""Pruning to a budget: ``mask.target=flops:2.0`` (or ``params:``, ``latency:``) instead of one amount for every
space, as papers report a pruned network — N× fewer FLOPs.

This module owns the target and its checks, the **cost model** of a network's channel graph, the **global
ranking** of every channel of the selected spaces, and the **search** for per-space amounts that meets the
target.

The cost model. Every conv and linear layer costs, in parameters, ``out · in · k`` (+ ``out`` for a bias) and in
FLOPs ``2 · out · in · k · positions`` (``k``: kernel elements, ``in``: input channels per group, ``positions``:
output positions per image, H·W for a conv, tokens for a linear layer) — exactly what
``torch.utils.flop_counter`` counts, which is what compaction measures. ``out`` shrinks by the pruned channels of
the spaces the layer writes (as a producer, or as a depthwise conv carrying them), ``in`` by those of the spaces it
reads (as a consumer: ``features_per_channel`` columns each after a flatten, one column per group's block for a
grouped conv), so each layer's cost is bilinear in the pruned counts; norms and per-channel scales are linear.
``positions`` come from ONE forward pass with shape hooks (under the FLOP counter, which also gives the measured
total); an attention's matrix products (which the counter counts on CPU from torch 2.15) are linear in the kept
rows of the q/k/v layer that feeds it; what the model does not describe (a layer called outside its module) is a
constant, the measured total minus the modelled one. A trial is then a few vector products: no retrace, no
forward per trial.

The ranking. Each space's scores (the criterion's, over the whole coupled group) are divided by the space's mean
score, so spaces compare, then by the space's cost per channel relative to the average, raised to
``mask.cost_weight`` (1: importance per unit of cost saved, the knapsack's greedy order; 0: importance alone, as
Torch-Pruning's global pruning ranks). Equal keys go most expensive first, so at equal importance the channels
that cost more to keep are removed first whatever the weight. Channels already pruned rank first (a gradual
schedule keeps earlier choices).

The search. Cutting the ``n`` lowest-ranked channels, each space's count rounded down to what it can keep
(``mask.round_to`` multiples of kept width; whole groups of a grouped conv; whole head multiples; the whole heads of
timm's attention, each its q, k and v rows) and capped at
``mask.max_amount``, costs less the larger ``n``: bisection finds the smallest ``n`` that meets the target, then a
greedy pass gives back, one step at a time, the most important pruned channels while the target still holds, so
rounding does not overshoot. Spaces the user fixes (``mask.amounts={glob: fraction}``) keep their amount and are
not ranked; an attention's q/k/v space follows the stream it is tied to.

``latency:`` is met through the FLOP model: the dense network and a cut at a FLOPs allocation are timed on the
run's device, and the FLOPs ratio searched is corrected from the timings (``Budget.calibrate_latency``: a few cuts,
not one per trial).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pruneflow.errors import ConfigError, is_count
from pruneflow.graph import ChannelSpace, is_depthwise, norm_width, trace_channel_graph
from pruneflow.graph.layers import PRODUCER_TYPES, PackedInProjection, attention_op_by_op
from pruneflow.pruning.criteria import Criterion, channels_to_prune
from pruneflow.pruning.selection import select_spaces

log = logging.getLogger(__name__)

METRICS = ("flops", "params", "latency")
TOLERANCE = 0.02  # the cut network's measured ratio is within ±2 % of the target
LATENCY_BATCH = 256  # latency targets are met, and checked after the cut, at this batch size
LATENCY_CALIBRATIONS = 4  # cuts timed, at most, to find the FLOPs ratio a latency target asks for


@dataclass(frozen=True)
class Target:
    """``metric`` (flops, params, latency) divided by ``ratio`` in the cut network."""

    metric: str
    ratio: float

    @classmethod
    def parse(cls, text: object) -> Target:
        """``"flops:2.0"`` → Target("flops", 2.0); one clear line for anything else."""
        metric, _, value = str(text).partition(":")
        if metric not in METRICS:
            raise ConfigError(
                f"mask.target={text!r} names an unknown metric {metric!r}; write <metric>:<ratio> with metric one of "
                f"{', '.join(METRICS)}, e.g. mask.target=flops:2.0"
            )
        try:
            ratio = float(value)
        except ValueError:
            ratio = math.nan
        if not math.isfinite(ratio) or ratio <= 1.0:
            raise ConfigError(
                f"mask.target={text!r}: the ratio must be a number above 1 (how many times smaller the cut network's "
                f"{metric} is), e.g. mask.target={metric}:2.0"
            )
        return cls(metric, ratio)

    def __str__(self) -> str:
        return f"{self.metric}:{self.ratio:g}"


def pruned_count(space: ChannelSpace, amount: float) -> int:
    """How many of ``space``'s channels ``Criterion.select`` prunes at ``amount`` (a route's slots aside)."""
    if space.whole_heads:
        return space.head_unit * channels_to_prune(space.heads, amount)
    if space.head_rows:
        return space.parts * space.heads * channels_to_prune(space.width // (space.parts * space.heads), amount)
    unit = space.multiple * space.groups * space.block
    return unit * channels_to_prune(space.width // unit, amount)


def allowed_counts(space: ChannelSpace, max_amount: float, round_to: int) -> np.ndarray:
    """The pruned counts ``space`` can take, ascending: whole units (a grouped conv's groups, an attention's head
    multiples, a GroupNorm's groups), at most ``max_amount`` of it, never all of it, and a kept width that is a
    multiple of ``round_to`` (or the whole width, nothing pruned)."""
    unit = space.multiple * space.groups * space.head_unit * space.block
    cap = min(int(max_amount * space.width + 1e-9), space.width - 1)
    counts = [p for p in range(0, cap + 1, unit) if p == 0 or (space.width - p) % round_to == 0]
    return np.asarray(counts, dtype=np.int64)


def matching_spaces(spaces: Sequence[ChannelSpace], pattern: str) -> list[ChannelSpace]:
    return [space for space in spaces if any(fnmatch.fnmatchcase(name, pattern) for name in space.names)]


# -- the cost model ---------------------------------------------------------------------------------
class CostModel:
    """Parameters and FLOPs per image of ``network`` as functions of the pruned counts of ``spaces`` (see the
    module docstring); ``image``: one input (a batch of one) for the shape pass."""

    def __init__(self, network: nn.Module, spaces: Sequence[ChannelSpace], image: Tensor) -> None:
        self.spaces = list(spaces)
        self.input_shape = tuple(image.shape[1:])
        self.index = {id(space): j for j, space in enumerate(self.spaces)}
        modules = dict(network.named_modules())
        layers = [(name, m) for name, m in modules.items() if isinstance(m, PRODUCER_TYPES)]
        # a producer that is no module of the network (``nn.MultiheadAttention``'s packed in_proj), or one its
        # attention computes with instead of calling it (``PrunableLayer.unit``), counts positions at the attention
        records = {layer.name: layer for space in self.spaces for layer in space.producers}
        layers += [(name, layer.producer) for name, layer in records.items() if name not in dict(layers)]
        row = {name: i for i, (name, _) in enumerate(layers)}
        units = {name: records[name].unit for name, _ in layers if name in records and records[name].unit is not None}
        attentions = {
            i: attention for i, (name, m) in enumerate(layers) if (attention := _attention_of(name, m, modules))
        }
        positions, attention_flops = _output_positions(
            network, [units.get(name, m) for name, m in layers], attentions, image
        )
        self.measured_flops = positions.pop("total")
        count, width = len(layers), len(self.spaces)
        self.out_full = np.array([m.weight.shape[0] for _, m in layers], dtype=np.float64)
        self.in_full = np.array([m.weight.shape[1] for _, m in layers], dtype=np.float64)
        kernel = np.array([m.weight[0, 0].numel() for _, m in layers], dtype=np.float64)
        self.flops_per_pair = 2.0 * kernel * np.array([positions.get(i, 0) for i in range(count)], dtype=np.float64)
        self.params_per_pair = kernel
        # the matrix products of an attention, by the qkv layer that feeds it: linear in its kept rows
        self.attention_flops = np.array([attention_flops.get(i, 0) for i in range(count)], dtype=np.float64)
        self.bias = np.array([getattr(m, "bias", None) is not None for _, m in layers], dtype=np.float64)
        self.out_rows = np.zeros((count, width))  # channels of layer i's output per pruned channel of space j
        self.in_rows = np.zeros((count, width))  # input columns per group of layer i per pruned channel of space j
        self.linear_params = np.zeros(width)  # norm and scale entries per pruned channel of space j
        for j, space in enumerate(self.spaces):
            for layer in space.producers:
                self.out_rows[row[layer.name], j] += 1
                if layer.norm is not None:
                    self.linear_params[j] += _entries_per_channel(layer.norm)
            for consumer in space.consumers:
                if consumer.name not in row or is_depthwise(modules[consumer.name]):
                    continue  # a depthwise conv reads one channel per group whatever the width: it is a producer
                read = _read_share(consumer.at, space.width)
                per_channel = (
                    consumer.block / space.width if consumer.kind == "grouped" else consumer.features_per_channel
                )
                self.in_rows[row[consumer.name], j] += read * per_channel
            for point in space.points:  # k entries per channel after a channel multiplier (``per_channel``)
                read = _read_share(point.at, space.width) * point.per_channel
                if point.name in row:  # a depthwise conv carrying several spaces
                    self.out_rows[row[point.name], j] += read
                elif point.entries:  # one without entries (a layer over another dim) loses nothing
                    self.linear_params[j] += read * _entries_per_channel(point.module)
            for scale in (*space.scales, *space.sources):  # a ViT's class token and position embedding too
                parameter = network.get_parameter(scale.name)
                per_channel = getattr(scale, "per_channel", 1)  # a source has one entry per channel
                self.linear_params[j] += per_channel * parameter.numel() / parameter.shape[scale.dim]
        full = np.zeros(width)
        self.flops_constant = self.measured_flops - self._modelled_flops(full)
        self.measured_params = sum(p.numel() for p in network.parameters())
        self.params_constant = self.measured_params - self._modelled_params(full)

    def _widths(self, pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.out_full - self.out_rows @ pruned, self.in_full - self.in_rows @ pruned

    def _modelled_flops(self, pruned: np.ndarray) -> float:
        out, inputs = self._widths(pruned)
        return float(np.sum(self.flops_per_pair * out * inputs + self.attention_flops * out / self.out_full))

    def _modelled_params(self, pruned: np.ndarray) -> float:
        out, inputs = self._widths(pruned)
        return float(np.sum(self.params_per_pair * out * inputs + self.bias * out) - self.linear_params @ pruned)

    def flops(self, pruned: np.ndarray) -> float:
        """FLOPs per image with ``pruned[j]`` channels of space j pruned."""
        return self.flops_constant + self._modelled_flops(pruned)

    def params(self, pruned: np.ndarray) -> float:
        return self.params_constant + self._modelled_params(pruned)

    def of(self, metric: str) -> Callable[[np.ndarray], float]:
        """The cost function of ``metric``; latency is searched through FLOPs (``Budget.calibrate``)."""
        return self.params if metric == "params" else self.flops

    def dense(self, metric: str) -> float:
        return self.measured_params if metric == "params" else self.measured_flops


def _read_share(at: tuple[int, ...], width: int) -> float:
    """The share of a space's channels a reordered reader reads (``Consumer.at``); all of them otherwise."""
    return sum(entry >= 0 for entry in at) / width if at else 1.0


def _entries_per_channel(module: nn.Module) -> float:
    """Parameters per channel of a norm (γ and β of an affine BatchNorm) or of a depthwise conv point."""
    return sum(p.numel() for p in module.parameters(recurse=False)) / norm_width(module)


def _attention_of(name: str, layer: nn.Module, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The attention a q/k/v projection feeds, whose matrix products scale with the projection's kept rows:
    ``nn.MultiheadAttention`` for its packed ``in_proj``, the parent of a layer named ``qkv`` (timm's attentions)."""
    if isinstance(layer, PackedInProjection):
        return layer.attention
    parent, _, leaf = name.rpartition(".")
    return modules.get(parent) if leaf == "qkv" else None


@torch.no_grad()
def _output_positions(
    network: nn.Module, layers: Sequence[nn.Module], attentions: Mapping[int, nn.Module], image: Tensor
) -> tuple[dict[object, int], dict[int, int]]:
    """Output positions per image of each of ``layers`` (by index; summed where a layer runs several times), and
    under ``"total"`` the FLOPs ``torch.utils.flop_counter`` counts: one forward, in eval mode. Second, the FLOPs
    the counter gives the attention ops (``scaled_dot_product_attention`` and its kernels; counted on CPU from
    torch 2.15) inside each of ``attentions`` (by the index of the layer feeding it)."""
    positions: dict[object, int] = {}
    attention_flops: dict[int, int] = {}

    def recorder(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: object, output: Tensor | tuple[Tensor, ...]) -> None:
            # a conv's (N, C, H, W) or a linear layer's (..., C): positions per image, the batch being one; an
            # attention's output (``nn.MultiheadAttention``'s first), channels last
            attention = isinstance(output, tuple) or not isinstance(module, (*PRODUCER_TYPES, nn.BatchNorm2d))
            output = output[0] if isinstance(output, tuple) else output
            channels_dim = -1 if isinstance(module, nn.Linear) or attention else 1
            positions[index] = positions.get(index, 0) + output.numel() // output.shape[channels_dim]

        return record

    def attention_ops() -> int:
        return sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))

    def timer(index: int) -> tuple[Callable[..., None], Callable[..., None]]:
        before: list[int] = []

        def start(module: nn.Module, args: object) -> None:
            before.append(attention_ops())

        def stop(module: nn.Module, args: object, output: object) -> None:
            attention_flops[index] = attention_flops.get(index, 0) + attention_ops() - before.pop()

        return start, stop

    handles = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    for index, attention in attentions.items():
        start, stop = timer(index)
        handles += [attention.register_forward_pre_hook(start), attention.register_forward_hook(stop)]
    modes = {module: module.training for module in network.modules()}
    network.eval()
    try:
        with attention_op_by_op(), FlopCounterMode(display=False) as counter:
            network.forward(image)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    positions["total"] = int(counter.get_total_flops())
    return positions, attention_flops


# -- the budget -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Allocation:
    """The search's answer: each space's pruned fraction (by its name, its first producer's), the pruned counts,
    and the ratio the cost model predicts for the cut network."""

    amounts: dict[str, float]
    pruned: dict[str, int]
    metric: str
    predicted_ratio: float


class Budget:
    """A target (``mask.target``) met by per-space amounts from one global ranking, each space under
    ``max_amount``, the ``amounts`` globs fixed by hand, kept widths in multiples of ``round_to``, the ranking's
    cost exponent ``cost_weight``.

    ``prepare`` builds the cost model once (and refuses an unreachable target); ``allocate`` ranks and searches
    at each pruning event; ``progress`` in (0, 1] walks the cost from the dense network's to the target's
    (a gradual schedule's steps).
    """

    def __init__(
        self,
        target: str | None,
        max_amount: float = 0.9,
        amounts: Mapping[str, float] | None = None,
        round_to: int = 1,
        cost_weight: float = 1.0,
    ) -> None:
        if isinstance(cost_weight, bool) or not isinstance(cost_weight, (int, float)) or not cost_weight >= 0:
            raise ConfigError(f"mask.cost_weight must be a number >= 0 (0: rank by importance alone), got "
                              f"{cost_weight!r}")  # fmt: skip
        self.cost_weight = float(cost_weight)
        if isinstance(max_amount, bool) or not isinstance(max_amount, (int, float)) or not 0 < max_amount < 1:
            raise ConfigError(f"mask.max_amount must be a fraction in (0, 1), got {max_amount!r}")
        if not is_count(round_to) or round_to < 1:
            raise ConfigError(f"mask.round_to must be a positive integer (kept widths in multiples of it), got "
                              f"{round_to!r}")  # fmt: skip
        self.target = Target.parse(target) if target is not None else None
        self.max_amount, self.round_to = float(max_amount), int(round_to)
        self.fixed: dict[str, float] = {}
        for pattern, amount in (amounts or {}).items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
                raise ConfigError(f"mask.amounts[{pattern}] must be a fraction in [0, 1), got {amount!r}")
            if amount > self.max_amount:
                raise ConfigError(
                    f"mask.amounts[{pattern}]={amount} is above mask.max_amount={self.max_amount}; lower it or raise "
                    "mask.max_amount"
                )
            self.fixed[str(pattern)] = float(amount)
        self.model: CostModel | None = None
        self.last: Allocation | None = None

    # -- what is fixed by hand, what is ranked ---------------------------------------------------------
    def fixed_amounts(self, spaces: Sequence[ChannelSpace]) -> dict[str, float]:
        """Each space a ``mask.amounts`` glob names → its amount (a later glob wins); a glob naming none is
        refused."""
        chosen: dict[str, float] = {}
        for pattern, amount in self.fixed.items():
            hits = matching_spaces(spaces, pattern)
            if not hits:
                names = ", ".join(name for space in spaces for name in space.names)
                raise ConfigError(f"mask.amounts names {pattern!r}, which matches no selected space; they are: {names}")
            chosen.update((space.name, amount) for space in hits)
        return chosen

    def prepare(self, network: nn.Module, spaces: Sequence[ChannelSpace], image: Tensor) -> None:
        """Build the cost model (one forward of ``image``) and refuse, before training, a target no allocation
        under the cap reaches, naming the largest one reachable."""
        self.fixed_amounts(spaces)
        if self.target is None:
            return
        self.model = CostModel(network, spaces, image)
        search = _Search(self, spaces, scores=None, already=None)
        reachable = search.ratio(search.counts(search.total))
        if reachable < self.target.ratio * (1 - TOLERANCE):
            metric = self.target.metric
            raise ConfigError(
                f"mask.target={self.target} cannot be reached: with every selected space at mask.max_amount="
                f"{self.max_amount:g} the cut network has at most {reachable:.3g}x fewer "
                f"{'FLOPs' if metric == 'latency' else metric}; the largest reachable target is "
                f"{metric}:{math.floor(reachable * 100) / 100:g} (or raise mask.max_amount, select more spaces with "
                "mask.layers / mask.groups=true)"
            )

    def allocate(
        self,
        criterion: Criterion,
        spaces: Sequence[ChannelSpace],
        already: Mapping[str, Tensor],
        progress: float = 1.0,
    ) -> Allocation:
        """Per-space amounts meeting the target (``progress`` of the way from the dense cost to it), from one
        ranking of all channels of the ranked spaces; ``already``: each space's mask so far, by space name."""
        if self.model is None or self.target is None:
            raise RuntimeError("Budget.allocate before Budget.prepare")
        assert self.target is not None
        goal_ratio = 1.0 / (1.0 - progress * (1.0 - 1.0 / self.target.ratio))
        self.last = self._search(criterion, spaces, already).run(goal_ratio)
        return self.last

    def _search(self, criterion: Criterion, spaces: Sequence[ChannelSpace], already: Mapping[str, Tensor]) -> _Search:
        scores = {space.name: criterion.scores(space).detach().float().cpu() for space in _ranked(self, spaces)}
        return _Search(self, spaces, scores, already)

    def calibrate_latency(
        self,
        network: nn.Module,
        criterion: Criterion,
        spaces: Sequence[ChannelSpace],
        already: Mapping[str, Tensor],
        progress: float,
        device_settings: Mapping[str, object],
    ) -> Allocation:
        """Latency is not arithmetic: cut a FLOPs allocation, time it against the dense network on the run's device
        (``device_settings``: ``device_latency_ms``'s device and precision), and search again for the FLOPs ratio
        the latency ratio asks for — proportionally after one timing, by the secant through the last two (in logs)
        after more; at most ``LATENCY_CALIBRATIONS`` cuts, not one per trial. The allocation's predicted ratio is
        its FLOPs ratio."""
        from pruneflow.compaction.cost import device_latency_ms  # compaction imports this package
        from pruneflow.compaction.cut import compact, effective_copy

        assert self.model is not None and self.target is not None
        goal = 1.0 / (1.0 - progress * (1.0 - 1.0 / self.target.ratio))
        search = self._search(criterion, spaces, already)
        dense, images = effective_copy(network), torch.randn(LATENCY_BATCH, *self.model.input_shape)
        flops_goal, timed = goal, []
        allocation = search.run(flops_goal)
        for _ in range(LATENCY_CALIBRATIONS):
            masks = {}
            for space in spaces:
                before = already.get(space.name, torch.zeros(space.width, dtype=torch.bool)).cpu()
                mask = criterion.select(space, allocation.amounts[space.name], before)
                masks.update((layer.name, mask) for layer in space.producers)
            latency = device_latency_ms({"before": dense, "after": compact(network, masks).model}, images, rounds=3,
                                        **device_settings)  # fmt: skip
            measured = latency["before"] / latency["after"]
            log.info("mask.target=%s: FLOPs ratio %.3f ran %.3fx faster at batch %d (goal %.3fx)", self.target,
                     allocation.predicted_ratio, measured, LATENCY_BATCH, goal)  # fmt: skip
            timed.append((math.log(allocation.predicted_ratio), math.log(max(measured, 1e-9))))
            if abs(measured / goal - 1) <= TOLERANCE / 2:
                break
            slope = 1.0  # proportional after one timing; then the secant through the last two, in logs
            if len(timed) > 1 and timed[-1][1] != timed[-2][1]:
                slope = (timed[-1][0] - timed[-2][0]) / (timed[-1][1] - timed[-2][1])
            flops_now, latency_now = timed[-1]
            flops_goal = math.exp(flops_now + max(slope, 0.1) * (math.log(goal) - latency_now))
            allocation = search.run(flops_goal)
        self.last = allocation
        return allocation

    def report(self) -> dict[str, object]:
        """What ``metrics.json`` records of the budget: the target, the per-space amounts, the predicted ratio."""
        if self.last is None or self.target is None:
            return {}
        return {
            "mask/target": str(self.target),
            "mask/amounts": dict(self.last.amounts),
            "mask/predicted_ratio": self.last.predicted_ratio,
        }

    def check_cut(self, metrics: Mapping[str, object]) -> dict[str, object]:
        """The cut network's measured ratio (from compaction's ``compact/*`` figures) against the target: within
        ±2 % or a warning saying by how much it missed."""
        if self.target is None:
            return {}
        metric = self.target.metric
        key = (f"compact/latency_{metrics.get('compact/latency_device', 'cpu')}_b{LATENCY_BATCH}_speedup"
               if metric == "latency" else f"compact/{metric}_ratio")  # fmt: skip
        measured = metrics.get(key)
        if not isinstance(measured, (int, float)):
            return {}
        met = abs(measured / self.target.ratio - 1.0) <= TOLERANCE
        if not met:
            log.warning("mask.target=%s: the cut network's measured %s ratio is %.4g, outside ±%g %%", self.target,
                        metric, measured, 100 * TOLERANCE)  # fmt: skip
        return {"compact/target": str(self.target), "compact/target_ratio": self.target.ratio,
                "compact/target_measured_ratio": float(measured), "compact/target_met": met}  # fmt: skip

    def state_dict(self) -> dict[str, object]:
        """The last allocation (numbers and strings), so a resumed run still reports it."""
        if self.last is None:
            return {}
        return {"budget_amounts": dict(self.last.amounts), "budget_pruned": dict(self.last.pruned),
                "budget_predicted_ratio": self.last.predicted_ratio}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        if "budget_amounts" in state and self.target is not None:
            amounts, pruned, ratio = state["budget_amounts"], state["budget_pruned"], state["budget_predicted_ratio"]
            assert isinstance(amounts, dict) and isinstance(pruned, dict) and isinstance(ratio, float)
            self.last = Allocation(dict(amounts), dict(pruned), self.target.metric, ratio)


def _ranked(budget: Budget, spaces: Sequence[ChannelSpace]) -> list[ChannelSpace]:
    """The spaces the global ranking decides: not fixed by hand, not tied to a stream."""
    fixed = budget.fixed_amounts(spaces)
    return [space for space in spaces if space.name not in fixed and space.tied_to is None]


class _Search:
    """One search over the cost model: the ranked channels in order, each space's allowed counts, and the cost of
    cutting the ``n`` lowest-ranked channels."""

    def __init__(
        self,
        budget: Budget,
        spaces: Sequence[ChannelSpace],
        scores: Mapping[str, Tensor] | None,
        already: Mapping[str, Tensor] | None,
    ) -> None:
        assert budget.model is not None and budget.target is not None
        self.model, self.spaces = budget.model, list(spaces)
        self.cost_weight = budget.cost_weight
        self.metric = "params" if budget.target.metric == "params" else "flops"  # latency: searched in FLOPs
        self.cost = self.model.of(self.metric)
        self.dense = self.model.dense(budget.target.metric)
        fixed = budget.fixed_amounts(spaces)
        self.base = np.zeros(len(self.model.spaces))  # fixed-by-hand counts
        for space in spaces:
            if space.name in fixed:
                self.base[self.model.index[id(space)]] = pruned_count(space, fixed[space.name])
        self.ranked = _ranked(budget, spaces)
        self.allowed = [allowed_counts(space, budget.max_amount, budget.round_to) for space in self.ranked]
        self.columns = np.array([self.model.index[id(space)] for space in self.ranked], dtype=np.int64)
        self.floor = np.zeros(len(self.ranked), dtype=np.int64)  # already pruned: never given back
        if already is not None:
            self.floor = np.array([int(already[space.name].sum()) if space.name in already else 0
                                   for space in self.ranked], dtype=np.int64)  # fmt: skip
        if scores is None:  # reachability only: every space at its cap
            self.order_space = np.repeat(np.arange(len(self.ranked)), [space.width for space in self.ranked])
            self.keys = np.zeros(len(self.order_space))
        else:
            self._rank(scores, already or {})
        self.total = len(self.order_space)

    def _rank(self, scores: Mapping[str, Tensor], already: Mapping[str, Tensor]) -> None:
        """One order of all ranked channels: importance normalised per space, divided by the space's relative
        cost per channel; already pruned channels first."""
        per_channel = np.array([self._cost_per_channel(i) for i in range(len(self.ranked))])
        positive = per_channel[per_channel > 0]
        mean_cost = float(positive.mean()) if positive.size else 1.0
        keys, owners = [], []
        for i, space in enumerate(self.ranked):
            score = scores[space.name].double()
            if space.groups > 1:  # a grouped conv's space is pruned by positions, the same in every group
                score = score.view(space.groups, -1).sum(0).repeat(space.groups)
            if space.block > 1:  # pruned by a GroupNorm's whole groups: every channel ranks as its group's mean
                score = score.view(-1, space.block).mean(-1).repeat_interleave(space.block)
            if space.whole_heads:  # pruned by whole heads: every row of a head ranks as its head's mean
                per_head = score.view(3, space.heads, -1).mean(dim=(0, 2))
                score = per_head.view(1, -1, 1).expand(3, -1, space.width // (3 * space.heads)).flatten()
            mean = float(score.mean())
            normalised = score.numpy() / (mean if mean > 0 else 1.0)
            relative_cost = per_channel[i] / mean_cost
            key = normalised / relative_cost**self.cost_weight if relative_cost > 0 else np.full(space.width, np.inf)
            mask = already.get(space.name)
            if mask is not None:
                key = np.where(mask.cpu().numpy(), -np.inf, key)
            keys.append(key)
            owners.append(np.full(space.width, i))
        flat_keys, flat_owners = np.concatenate(keys), np.concatenate(owners)
        # equal keys: the channel that costs more to keep goes first, whatever mask.cost_weight
        order = np.lexsort((-per_channel[flat_owners], flat_keys))
        self.keys, self.order_space = flat_keys[order], flat_owners[order]

    def _cost_per_channel(self, i: int) -> float:
        """What one pruned channel of ranked space ``i`` saves, at full width (one unit, per channel)."""
        unit = int(self.allowed[i][1]) if len(self.allowed[i]) > 1 else 1
        one = self.base.copy()
        one[self.columns[i]] += unit
        return (self.cost(self.base) - self.cost(one)) / unit

    def counts(self, n: int) -> np.ndarray:
        """Each ranked space's count when the ``n`` lowest-ranked channels go, rounded down to an allowed count."""
        raw = np.bincount(self.order_space[:n], minlength=len(self.ranked))
        counts = np.empty(len(self.ranked), dtype=np.int64)
        for i, allowed in enumerate(self.allowed):
            counts[i] = max(allowed[np.searchsorted(allowed, raw[i], side="right") - 1], self.floor[i])
        return counts

    def pruned(self, counts: np.ndarray) -> np.ndarray:
        """All spaces' pruned counts: the fixed, the ranked, and the tied ones following their streams."""
        pruned = self.base.copy()
        pruned[self.columns] = counts
        for space in self.model.spaces:
            if space.tied_to is not None and id(space.tied_to) in self.model.index:
                stream = space.tied_to
                amount = pruned[self.model.index[id(stream)]] / stream.width
                pruned[self.model.index[id(space)]] = pruned_count(space, amount)
        return pruned

    def ratio(self, counts: np.ndarray) -> float:
        return self.dense / self.cost(self.pruned(counts))

    def run(self, goal_ratio: float) -> Allocation:
        goal = self.dense / goal_ratio
        low, high = 0, self.total  # cost(counts(high)) <= goal, or nothing does
        if self.cost(self.pruned(self.counts(high))) <= goal:
            while high - low > 1:
                middle = (low + high) // 2
                if self.cost(self.pruned(self.counts(middle))) <= goal:
                    high = middle
                else:
                    low = middle
        # within half the tolerance above the goal: the other half is left to what the model does not describe
        counts = self._balance(self._give_back(self.counts(high), goal * (1 + TOLERANCE / 2)), goal)
        pruned = self.pruned(counts)
        amounts = {space.name: float(pruned[self.model.index[id(space)]]) / space.width for space in self.spaces}
        return Allocation(
            amounts=amounts,
            pruned={space.name: int(pruned[self.model.index[id(space)]]) for space in self.spaces},
            metric=self.metric,
            predicted_ratio=self.dense / self.cost(pruned),
        )

    def _give_back(self, counts: np.ndarray, goal: float) -> np.ndarray:
        """Rounding prunes past the goal: give back one allowed step at a time, of the space whose last pruned
        channel ranks highest, while the cost stays within the goal."""
        counts = counts.copy()
        last_key = self._last_keys()
        for _ in range(sum(len(allowed) for allowed in self.allowed)):
            best, best_key = None, -np.inf
            for i, allowed in enumerate(self.allowed):
                position = np.searchsorted(allowed, counts[i]) - 1
                if position < 0 or allowed[position] < self.floor[i]:
                    continue
                trial = counts.copy()
                trial[i] = allowed[position]
                key = last_key[i](counts[i])
                if key > best_key and self.cost(self.pruned(trial)) <= goal:
                    best, best_key = trial, key
            if best is None:
                return counts
            counts = best
        return counts

    def _balance(self, counts: np.ndarray, goal: float) -> np.ndarray:
        """Coarse steps (``round_to``, whole groups) can leave no single give-back within the tolerance: move one
        step of one space, or give one back and take one from another, whichever lands nearest the goal, until
        within half the tolerance or no move comes nearer."""
        counts = counts.copy()
        for _ in range(len(self.ranked)):
            distance = abs(self.cost(self.pruned(counts)) / goal - 1)
            if distance <= TOLERANCE / 2:
                break
            best, best_distance = None, distance
            for trial in self._moves(counts):
                trial_distance = abs(self.cost(self.pruned(trial)) / goal - 1)
                if trial_distance < best_distance:
                    best, best_distance = trial, trial_distance
            if best is None:
                break
            counts = best
        return counts

    def _moves(self, counts: np.ndarray) -> list[np.ndarray]:
        """Every count vector one step (one allowed count up or down, never under what is already pruned) of one
        space away from ``counts``, and every one giving a step back in one space and taking one in another."""
        down, up = [], []
        for i, allowed in enumerate(self.allowed):
            position = int(np.searchsorted(allowed, counts[i]))
            if position > 0 and allowed[position - 1] >= self.floor[i]:
                down.append((i, int(allowed[position - 1])))
            if position + 1 < len(allowed):
                up.append((i, int(allowed[position + 1])))
        moves = []
        for changes in [[move] for move in down + up] + [[d, u] for d in down for u in up if d[0] != u[0]]:
            trial = counts.copy()
            for i, value in changes:
                trial[i] = value
            moves.append(trial)
        return moves

    def _last_keys(self) -> list[Callable[[int], float]]:
        """For each ranked space, count → the rank key of its ``count``-th lowest channel."""
        keys = [np.sort(self.keys[self.order_space == i]) for i in range(len(self.ranked))]
        return [lambda count, k=k: float(k[count - 1]) if 0 < count <= len(k) else -np.inf for k in keys]


def allocate_budget(
    network: nn.Module,
    target: str,
    image: Tensor,
    criterion: Criterion,
    layers: Sequence[str] | None = None,
    groups: bool = True,
    **settings: object,
) -> Allocation:
    """Per-space amounts and the predicted ratio for ``network`` cut to ``target`` (``"flops:2.0"``, ``"params:…"``),
    outside any training run: what a benchmark or a user comparing pruners asks first. ``layers``/``groups`` select
    the spaces as ``mask.layers``/``mask.groups`` do; ``settings``: ``Budget``'s (max_amount, amounts, round_to,
    cost_weight). Latency needs timed cuts: ``Budget.calibrate_latency``."""
    spaces = select_spaces(trace_channel_graph(network).spaces, layers, groups)
    criterion.bind(network)
    criterion.check(spaces)
    budget = Budget(target, **settings)  # type: ignore[arg-type]
    budget.prepare(network, spaces, image)
    return budget.allocate(criterion, spaces, {})


def example_image(
    trainer: L.Trainer, pl_module: L.LightningModule | None, network: nn.Module, batch: object = None
) -> Tensor | None:
    """One input for the cost model's shape pass, on the network's device: the first image of ``batch``, else
    zeros of the datamodule's ``input_shape``, else the module's ``example_input_array``; None if none is known
    yet."""
    device = next(network.parameters()).device
    if batch is not None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(images, Tensor):
            return images[:1].to(device)
    shape = getattr(getattr(trainer, "datamodule", None), "input_shape", None)
    if shape is not None:
        return torch.zeros(1, *shape, device=device)
    example = getattr(pl_module, "example_input_array", None)
    return example[:1].to(device) if isinstance(example, Tensor) else None


@rank_zero_only
def log_allocation(trainer: L.Trainer, allocation: Allocation) -> None:
    """Each space's amount as a scalar (``mask/amount/<space>``) and, in TensorBoard, as one text table; the
    predicted ratio as ``mask/predicted_ratio``."""
    scalars = {f"mask/amount/{name}": amount for name, amount in allocation.amounts.items()}
    scalars["mask/predicted_ratio"] = allocation.predicted_ratio
    rows = "\n".join(f"| {name} | {amount:.4f} | {allocation.pruned[name]} |"
                     for name, amount in allocation.amounts.items())  # fmt: skip
    table = f"predicted {allocation.metric} ratio {allocation.predicted_ratio:.4f}\n\n| space | amount | pruned |\n" \
            f"|---|---|---|\n{rows}"  # fmt: skip
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("mask/amounts", table, trainer.global_step)
    log.info("budget: predicted %s ratio %.4f with amounts %s", allocation.metric, allocation.predicted_ratio,
             {name: round(amount, 3) for name, amount in allocation.amounts.items()})  # fmt: skip
