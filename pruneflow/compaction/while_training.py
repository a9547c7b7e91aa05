"""Cutting while training: the masked network made physically smaller inside a running fit.

``compact`` (the same cut as ``compact=true``) builds the smaller modules; ``swap_in`` puts them into the live
network in place of the masked ones and carries every optimizer over: its parameter groups point at the new
parameters and each kept entry's state is cut as the parameter was (``cut_tensor``: producer rows, consumer
columns, norm entries, per-channel parameters such as ConvNeXt's ``layer_scale``) along every dim that follows
the parameter's: SGD's ``momentum_buffer``, Adam's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (shaped
like the parameter), Adafactor's factored ``row_var`` / ``col_var`` (the parameter's dims, some reduced to 1,
which stay); scalars such as Adam's ``step`` are kept. State that follows no dim of its parameter is refused
before anything changes, and optimizers whose state is not per parameter (``UNCARRIABLE_OPTIMIZERS``) by name
before training. Learning-rate schedulers hold the optimizer, not its parameters, so they go on; so does
gradient clipping, which reads the parameter groups. Only the replaced modules change: every other parameter
keeps its identity and its state.

A checkpoint written after the cut holds the smaller network; the pruning callback's state records its
widths (``TrainingCut.sizes``), which ``compaction.cut.apply_sizes`` gives a fresh network before the
weights load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pruneflow.compaction.cost import count_flops, count_parameters
from pruneflow.compaction.cut import (
    Compaction,
    CompactionError,
    cut_tensor,
    is_channels_last,
    replace_module,
    replace_parameter,
    set_attributes,
    sized_by_attributes,
)
from pruneflow.compaction.layouts import tensor_keep

log = logging.getLogger(__name__)

Moved = dict[nn.Parameter, tuple[nn.Parameter, Tensor | None, Tensor | None]]


@dataclass
class TrainingCut:
    """What a cut inside training did: the new widths and the sizes before and after."""

    sizes: dict[str, dict[str, int]]
    channels: tuple[int, int]
    params: tuple[int, int]
    flops: tuple[int, int] | None  # per image; None where no example input was at hand

    def metrics(self, step: int) -> dict[str, float | int]:
        figures: dict[str, float | int] = {"cut/step": step}
        pairs = {"channels": self.channels, "params": self.params}
        if self.flops is not None:
            pairs["flops"] = self.flops
        for figure, (before, after) in pairs.items():
            figures[f"cut/{figure}_before"] = before
            figures[f"cut/{figure}_after"] = after
            figures[f"cut/{figure}_ratio"] = before / max(after, 1)
        return figures


# Optimizers whose state is not per parameter, so no cut can slice it: refused by name before training.
UNCARRIABLE_OPTIMIZERS = {
    "LBFGS": "its curvature history is one flat vector over every parameter",
}


def refuse_uncarriable(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    for optimizer in optimizers:
        why = UNCARRIABLE_OPTIMIZERS.get(type(optimizer).__name__)
        if why is not None:
            raise CompactionError(
                f"cannot carry {type(optimizer).__name__}'s state across the cut ({why}); use another optimizer, "
                "or cut after training with compact=true"
            )


@torch.no_grad()
def swap_in(
    network: nn.Module,
    compaction: Compaction,
    optimizers: Iterable[torch.optim.Optimizer],
    example: Tensor | None = None,
) -> TrainingCut:
    """Replace ``network``'s modules by ``compaction``'s cut ones, in place, and carry ``optimizers`` over.

    ``network`` must be the (hook- and parametrization-free) network ``compaction`` was cut from;
    ``example``: one input, to count FLOPs per image before and after.
    """
    optimizers = list(optimizers)
    refuse_uncarriable(optimizers)
    params_before = count_parameters(network)
    flops_before = None if example is None else count_flops(network, example)
    old = dict(network.named_parameters())
    new_parameters = dict(compaction.model.named_parameters())
    moved: Moved = {}
    for name, (out_keep, in_keep) in compaction.kept.items():
        # a module's own parameters, or a per-channel parameter (``ChannelScale``) by its name
        module = None if name in new_parameters else compaction.model.get_submodule(name)
        tensor_names = [""] if module is None else [f".{t}" for t, _ in module.named_parameters(recurse=False)]
        for tensor_name in tensor_names:
            keep = (out_keep, in_keep)
            if module is not None:  # where its tensors hold its rows (``tensor_keep``; an LSTM's by the one cut from)
                keep = tensor_keep(network.get_submodule(name), tensor_name[1:], out_keep, in_keep)
            moved[old[name + tensor_name]] = (new_parameters[name + tensor_name], *keep)
    for optimizer in optimizers:  # every state checked before anything changes
        check_state_follows(optimizer, moved)
    for name in compaction.kept:
        if name in new_parameters:
            replace_parameter(network, name, new_parameters[name])
            continue
        new = compaction.model.get_submodule(name)
        if is_channels_last(network.get_submodule(name)):
            new.to(memory_format=torch.channels_last)  # keeps the parameter objects
        replace_module(network, name, new)
    for optimizer in optimizers:
        carry_optimizer(optimizer, moved)
        zero_padding_state(optimizer, compaction)
    for name, widths in compaction.sizes.items():  # an attention's head count or width, a split's: attributes
        if name in compaction.kept or name in compaction.kept_along:  # a layer or a parameter, swapped in
            continue
        if sized_by_attributes(module := network.get_submodule(name), widths):
            set_attributes(module, widths)
    for name, (dim, keep) in compaction.kept_along.items():  # a source cut along its tokens' channels
        for optimizer in optimizers:
            carry_along(optimizer, old[name], new_parameters[name], dim, keep)
        replace_parameter(network, name, new_parameters[name])
    before, after = compaction.channels
    flops = None if flops_before is None else (flops_before, count_flops(network, example))
    return TrainingCut(compaction.sizes, (before, after), (params_before, count_parameters(network)), flops)


@torch.no_grad()
def carry_along(optimizer: torch.optim.Optimizer, old: Tensor, new: nn.Parameter, dim: int, keep: Tensor) -> None:
    """Point ``optimizer`` at ``new``, ``old`` cut to the entries ``keep`` along ``dim``, with its state cut alike
    (a state shaped otherwise, a step count, as it is)."""
    for group in optimizer.param_groups:
        group["params"] = [new if parameter is old else parameter for parameter in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: value.index_select(dim, keep.to(value.device))
            if isinstance(value, Tensor) and value.shape == old.shape
            else value
            for key, value in state.items()
        }


@torch.no_grad()
def zero_padding_state(optimizer: torch.optim.Optimizer, compaction: Compaction) -> None:
    """Zero the carried state of the zero channels that pad a reordered space (``Compaction.padding``): each took
    a kept entry's state to be cut, and a momentum would move a channel whose gradient is exactly zero."""
    for name, (rows, columns) in compaction.padding.items():
        for parameter in compaction.model.get_submodule(name).parameters(recurse=False):
            for value in optimizer.state.get(parameter, {}).values():
                if not isinstance(value, Tensor) or value.ndim == 0 or not follows(value, parameter):
                    continue
                if rows is not None and len(rows) and value.shape[0] == parameter.shape[0]:
                    value.index_fill_(0, rows.to(value.device), 0.0)
                if columns is not None and len(columns) and value.ndim >= 2 and value.shape[1] == parameter.shape[1]:
                    value.index_fill_(1, columns.to(value.device), 0.0)


def follows(state: Tensor, parameter: Tensor) -> bool:
    """Whether each dim of ``state`` is its parameter's or 1 (a statistic over that dim, e.g. Adafactor's
    factored second moments ``row_var``, ``col_var``)."""
    return state.ndim == parameter.ndim and all(s in (1, p) for s, p in zip(state.shape, parameter.shape, strict=True))


def cut_state(state: Tensor, parameter: Tensor, out_keep: Tensor | None, in_keep: Tensor | None) -> Tensor:
    """``state`` cut as its ``parameter`` is, along the dims it shares with it (dims of size 1 stay)."""
    if state.ndim == 0:
        return state
    rows = out_keep if state.shape[0] == parameter.shape[0] else None
    columns = in_keep if state.ndim >= 2 and state.shape[1] == parameter.shape[1] else None
    return cut_tensor(state, rows, columns)


def check_state_follows(optimizer: torch.optim.Optimizer, moved: Moved) -> None:
    """Refuse, naming the optimizer and the entry, state that no slicing of its parameter's dims can cut."""
    for parameter in moved:
        for key, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, Tensor) and value.ndim and not follows(value, parameter):
                raise CompactionError(
                    f"cannot carry {type(optimizer).__name__}'s state {key!r} {tuple(value.shape)} across the cut of a "
                    f"{tuple(parameter.shape)} parameter: its dims do not follow the parameter's; cut after training "
                    "with compact=true"
                )


def carry_optimizer(optimizer: torch.optim.Optimizer, moved: Moved) -> None:
    """Point ``optimizer`` at the new parameters of ``moved`` (old → (new, rows kept, columns kept)) and cut
    each one's state along the dims that follow its parameter (``check_state_follows`` first)."""
    for group in optimizer.param_groups:
        params = []
        for parameter in group["params"]:
            target = moved.get(parameter)
            if target is None:
                params.append(parameter)
                continue
            new, out_keep, in_keep = target
            state = optimizer.state.pop(parameter, None)
            if state:
                optimizer.state[new] = {
                    key: cut_state(value, parameter, out_keep, in_keep) if isinstance(value, Tensor) else value
                    for key, value in state.items()
                }
            params.append(new)
        group["params"] = params
