"""Importance over whole coupled groups (``mask.group_reduction``), and the FPGM and LAMP criteria.

A space's channel ``c`` is removed at every member of its group at once: each producer's row ``c`` and each
consumer's columns reading ``c`` (a conv's input slice ``weight[:, c]``, a linear layer's feature block after a
flatten, a grouped conv's column in its group, a reordered reader's column ``at[c]``). So with
``mask.group_reduction=mean|sum|max`` the score of channel ``c`` reduces, over every member, what that member
loses: ``l1`` Σ|w|, ``l2`` Σw² (square root after the reduction), ``taylor`` |Σ w·∂L/∂w| over the gathered steps,
``bn_gamma`` |γ| over every norm of the space (the producers' and the channel points'), ``fpgm`` the summed
distance of the channel's weights to the others' (He et al. 2019: channels near the geometric median are
replaceable by the rest), ``lamp`` Σw² rescaled as LAMP does (Lee et al. 2021: each score over the sum of the
scores not below it, so scores compare across spaces). ``group_reduction=producers`` (the default) is the
criteria's own reading: their producers' kernels summed, consumers left out.

Members are read from the live modules at each selection, under any parametrization (``module.weight`` is the
effective weight). A reader whose layout the gathering cannot follow (a grouped conv reading part of a wider
tensor) adds nothing, and the log says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, Consumer, PrunableLayer, is_depthwise, is_producer
from pruneflow.pruning.criteria import (
    CRITERIA,
    BnGamma,
    Criterion,
    Taylor,
    make_criterion,
    parametrized_grad,
)

log = logging.getLogger(__name__)

PRODUCERS = "producers"  # the criteria's own reading: producers only, summed
GROUP_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda members: members.mean(0),
    "sum": lambda members: members.sum(0),
    "max": lambda members: members.max(0).values,
}
REDUCTION_NAMES = (PRODUCERS, *GROUP_REDUCTIONS)


def consumer_columns(consumer: Consumer, weight: Tensor, width: int) -> Tensor | None:
    """The consumer's weights that read each of the space's ``width`` channels, one row per channel (zeros where a
    reordered reader does not read it); None where the layout cannot be followed."""
    out = weight.shape[0]
    if consumer.kind == "grouped":
        block = consumer.block
        if block == 0 or width % block or weight.shape[1] != block or out % (width // block):
            return None
        groups = width // block  # rows of group g read the g-th block of the space
        return weight.reshape(groups, out // groups, block, -1).permute(0, 2, 1, 3).reshape(width, -1)
    if consumer.at:
        at = torch.tensor(consumer.at)
        read = at >= 0
        if int(at.max()) >= weight.shape[1]:
            return None
        rows = torch.zeros(width, weight[:, 0].numel(), dtype=weight.dtype, device=weight.device)
        columns = weight.index_select(1, at[read].to(weight.device))
        rows[read.to(weight.device)] = (
            columns.reshape(out, int(read.sum()), -1).permute(1, 0, 2).reshape(int(read.sum()), -1)
        )
        return rows
    columns = consumer.columns(torch.arange(width))
    if int(columns.max()) >= weight.shape[1]:
        return None
    k = consumer.features_per_channel
    gathered = weight.index_select(1, columns.to(weight.device))
    return gathered.reshape(out, width, k, -1).permute(1, 0, 2, 3).reshape(width, -1)


class GroupMembers:
    """Every member's weights per channel of a space: the producers' rows and the consumers' columns, read from
    the modules of the network bound at selection time (``Criterion.bind``)."""

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self._refused: set[str] = set()

    def bind(self, network: nn.Module) -> None:
        self.modules = dict(network.named_modules())

    def consumers(self, space: ChannelSpace) -> list[tuple[Consumer, nn.Module]]:
        found = []
        for consumer in space.consumers:
            module = self.modules.get(consumer.name)
            if module is not None and not is_depthwise(module):
                found.append((consumer, module))
        return found

    def rows(
        self,
        space: ChannelSpace,
        of: Callable[[nn.Module], Tensor | None],
        consumers: bool = True,
        detach: bool = True,
    ) -> list[Tensor]:
        """Per member, a (width, n) tensor of ``of(module)`` (its weight, or weight·gradient) for each channel; the
        producers only without ``consumers``; differentiable without ``detach`` (a regulariser's penalty)."""
        members = []
        for layer in space.producers:
            value = of(layer.producer)
            if value is not None:
                members.append((value.detach() if detach else value).float().flatten(1))
        for consumer, module in self.consumers(space) if consumers else []:
            value = of(module)
            if value is None:
                continue
            rows = consumer_columns(consumer, (value.detach() if detach else value).float(), space.width)
            if rows is None:
                if consumer.name not in self._refused:
                    self._refused.add(consumer.name)
                    log.info("group importance: %s reads %s in a layout it cannot gather; left out", consumer.name,
                             space.name)  # fmt: skip
                continue
            members.append(rows)
        return members


def _weight(module: nn.Module) -> Tensor:
    return module.weight


class GroupCriterion(Criterion):
    """A criterion whose score reduces a per-member score over every member of the group."""

    reduce: Callable[[Tensor], Tensor]

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction
        self.reduce = GROUP_REDUCTIONS.get(reduction, GROUP_REDUCTIONS["sum"])  # producers: summed
        self.members = GroupMembers()

    def bind(self, network: nn.Module) -> None:
        self.members.bind(network)

    def member_scores(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, space: ChannelSpace) -> Tensor:
        rows = self.members.rows(space, _weight, consumers=self.reduction != PRODUCERS)
        return self.finish(self.reduce(torch.stack([self.member_scores(member).cpu() for member in rows])))

    def finish(self, reduced: Tensor) -> Tensor:
        return reduced


class GroupL1(GroupCriterion):
    """Σ|w| per member, reduced over the group."""

    name = "l1"

    def member_scores(self, rows: Tensor) -> Tensor:
        return rows.abs().sum(1)


class GroupL2(GroupCriterion):
    """√(reduction of Σw² per member)."""

    name = "l2"

    def member_scores(self, rows: Tensor) -> Tensor:
        return rows.pow(2).sum(1)

    def finish(self, reduced: Tensor) -> Tensor:
        return reduced.sqrt()


class FPGM(GroupCriterion):
    """Filter pruning via the geometric median (He et al. 2019): Σ_j ‖w_c − w_j‖₂ per member, reduced; the channels
    nearest the others' median are the most replaceable. Reduction ``producers`` reads the producers only."""

    name = "fpgm"

    def member_scores(self, rows: Tensor) -> Tensor:
        return torch.cdist(rows.unsqueeze(0), rows.unsqueeze(0)).squeeze(0).sum(1)


class LAMP(GroupL2):
    """LAMP (Lee et al. 2021) on the group's Σw²: s_c / Σ_{j: s_j ≥ s_c} s_j, in (0, 1], the strongest channel 1."""

    name = "lamp"

    def finish(self, reduced: Tensor) -> Tensor:
        return lamp_scores(reduced)


def lamp_scores(squares: Tensor) -> Tensor:
    """Each score over the sum of the scores not below it (ties: each counts all of its equals)."""
    order = torch.argsort(squares, descending=True, stable=True)
    sorted_scores = squares[order]
    suffix = torch.cumsum(sorted_scores, 0)  # descending: the running sum is over the scores not below each
    # equal scores share the largest running sum of their run, so the order of equals does not matter
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    run_end = torch.cumsum(counts, 0) - 1
    denominators = suffix[run_end][inverse]
    lamp = torch.empty_like(squares)
    lamp[order] = sorted_scores / denominators.clamp_min(torch.finfo(squares.dtype).tiny)
    return lamp


class GroupBnGamma(BnGamma):
    """|γ| over every norm of the space, reduced: the producers' norms and its channel points (norms reading it
    among other channels, at their entries)."""

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction
        self.reduce = GROUP_REDUCTIONS[reduction]

    def scores(self, space: ChannelSpace) -> Tensor:
        members = self._gammas(space)
        for point in space.points:
            gamma = getattr(point.module, "weight", None)
            if gamma is None or is_producer(point.module):
                continue
            channels, entries = point.placed(space.width)
            row = torch.zeros(space.width)
            row[channels] = gamma.detach().abs().float().cpu()[entries]
            members.append(row)
        return self.reduce(torch.stack([member.cpu() for member in members]))


class GroupTaylor(Taylor):
    """|Σ w·∂L/∂w| per member over the gathered steps, reduced over the group: consumers' columns too."""

    def __init__(self, batches: int, reduction: str) -> None:
        super().__init__(batches)
        self.reduction = reduction
        self.reduce = GROUP_REDUCTIONS[reduction]
        self.members = GroupMembers()

    def bind(self, network: nn.Module) -> None:
        self.members.bind(network)

    def before_optimizer_step(self, layers: Sequence[PrunableLayer]) -> None:
        if self.pending is None:
            return
        spaces = {id(layer.space): layer.space for layer in layers if layer.space is not None}
        for space in spaces.values():
            members = self.members.rows(space, _weight_times_gradient)
            if len(members) < len(space.producers):  # a producer without a gradient: nothing to gather this step
                continue
            contribution = torch.stack([rows.sum(1) for rows in members])
            previous = self.sums.get(space.name)
            self.sums[space.name] = contribution if previous is None else previous + contribution
        self.pending += 1

    def scores(self, space: ChannelSpace) -> Tensor:
        if space.name not in self.sums:
            raise RuntimeError(f"no gradients were gathered for {space.name} before selecting by taylor")
        return self.reduce(self.sums[space.name].float().cpu().abs())


def _weight_times_gradient(module: nn.Module) -> Tensor | None:
    grad = module.weight.grad if module.weight.grad is not None else parametrized_grad(module)
    return None if grad is None else module.weight.detach() * grad


GROUP_CRITERIA: dict[str, Callable[..., Criterion]] = {
    "l1": lambda reduction, **_: GroupL1(reduction),
    "l2": lambda reduction, **_: GroupL2(reduction),
    "fpgm": lambda reduction, **_: FPGM(reduction),
    "lamp": lambda reduction, **_: LAMP(reduction),
    "bn_gamma": lambda reduction, **_: GroupBnGamma(reduction),
    "taylor": lambda reduction, taylor_batches, **_: GroupTaylor(taylor_batches, reduction),
}
GROUP_ONLY = ("fpgm", "lamp")  # no reading of their own: under ``producers`` the producers' rows, summed


def importance_names() -> tuple[str, ...]:
    """Every ``mask.criterion``: the registered criteria (read when asked: a user may register one in
    ``criteria.CRITERIA`` after this module is imported) and the group-only ones."""
    return (*CRITERIA, *GROUP_ONLY)


def make_importance(
    name: str,
    group_reduction: str = PRODUCERS,
    channels: Mapping[str, Sequence[int]] | None = None,
    taylor_batches: int = 8,
    seed: int = 0,
) -> Criterion:
    """The criterion ``name`` reading its group as ``group_reduction`` says (``producers``: the criterion's own
    reading; ``mean``/``sum``/``max``: every member)."""
    if name not in importance_names():
        raise ConfigError(f"unknown mask.criterion {name!r}; choose one of: {', '.join(importance_names())}")
    if group_reduction not in REDUCTION_NAMES:
        raise ConfigError(
            f"unknown mask.group_reduction {group_reduction!r}; choose one of: {', '.join(REDUCTION_NAMES)}"
        )
    if channels and name in GROUP_ONLY:
        raise ConfigError(f"mask.channels is only used with mask.criterion=explicit, not {name!r}")
    # the criteria's own checks of the other settings (taylor_batches, seed, channels)
    criterion = make_criterion(name if name not in GROUP_ONLY else "l1", channels, taylor_batches, seed)
    if group_reduction == PRODUCERS and name not in GROUP_ONLY:
        return criterion
    if name not in GROUP_CRITERIA:
        raise ConfigError(
            f"mask.group_reduction={group_reduction} reduces over a group's members, which mask.criterion={name} "
            f"does not score; use it with {', '.join(GROUP_CRITERIA)}, or mask.group_reduction={PRODUCERS}"
        )
    return GROUP_CRITERIA[name](group_reduction, taylor_batches=taylor_batches)
