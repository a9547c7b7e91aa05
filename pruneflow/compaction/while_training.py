"""Cutting while training: the masked network made physically smaller inside a running fit.

``compact`` (the same cut as ``compact=true``) builds the smaller modules; ``swap_in`` puts them into the
live network in place of the masked ones and carries every optimizer over: its parameter groups point
at the new parameters and each kept entry's state — SGD's ``momentum_buffer``, Adam's ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq`` (anything shaped like the parameter) — is cut exactly as the
parameter was (``cut_tensor``: producer rows, consumer columns, BatchNorm entries); scalars such as
Adam's ``step`` are kept. Learning-rate schedulers hold the optimizer, not its parameters, so they go
on; so does gradient clipping, which reads the parameter groups. Only the replaced modules change:
every other parameter keeps its identity and its state.

A checkpoint written after the cut holds the smaller network. ``sizes_in_state_dict`` reads the widths
back from a state dict's shapes, so a fresh (full-size) network can take that shape before the weights
load (``apply_sizes``) — the pruning callback does it in a load-state-dict pre-hook, which plain
``Trainer.fit(ckpt_path=...)`` reaches before it loads the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pruneflow.compaction.cost import count_flops, count_parameters
from pruneflow.compaction.cut import RESIZABLE, Compaction, cut_tensor, replace_module, resized
from pruneflow.pruning.channels import is_depthwise

log = logging.getLogger(__name__)


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


def _channels_last(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.ndim == 4
        and not weight.is_contiguous()
        and weight.is_contiguous(memory_format=torch.channels_last)
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
    params_before = count_parameters(network)
    flops_before = None if example is None else count_flops(network, example)
    old = dict(network.named_parameters())
    moved: dict[nn.Parameter, tuple[nn.Parameter, Tensor | None, Tensor | None]] = {}
    for name, (out_keep, in_keep) in compaction.kept.items():
        new = compaction.model.get_submodule(name)
        if _channels_last(network.get_submodule(name)):
            new.to(memory_format=torch.channels_last)  # keeps the parameter objects
        replace_module(network, name, new)
        for tensor_name, parameter in new.named_parameters(recurse=False):
            moved[old[f"{name}.{tensor_name}"]] = (parameter, out_keep, in_keep)
    for optimizer in optimizers:
        carry_optimizer(optimizer, moved)
    before, after = compaction.channels
    flops = None if flops_before is None else (flops_before, count_flops(network, example))
    return TrainingCut(compaction.sizes, (before, after), (params_before, count_parameters(network)), flops)


def carry_optimizer(
    optimizer: torch.optim.Optimizer, moved: Mapping[nn.Parameter, tuple[nn.Parameter, Tensor | None, Tensor | None]]
) -> None:
    """Point ``optimizer`` at the new parameters of ``moved`` (old → (new, rows kept, columns kept)) and cut
    each one's per-element state as its parameter was cut."""
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
                    key: cut_tensor(value, out_keep, in_keep)
                    if isinstance(value, Tensor) and value.shape == parameter.shape
                    else value
                    for key, value in state.items()
                }
            params.append(new)
        group["params"] = params


def _widths(module: nn.Module, tensor: Tensor) -> dict[str, int]:
    """The constructor widths of ``module`` rebuilt to hold ``tensor`` as its weight (or running mean)."""
    _, (out_arg, in_arg) = RESIZABLE[type(module)]
    if in_arg is None:
        return {out_arg: int(tensor.shape[0])}
    if is_depthwise(module):
        return {out_arg: int(tensor.shape[0]), in_arg: int(tensor.shape[0]), "groups": int(tensor.shape[0])}
    groups = getattr(module, "groups", 1)
    return {out_arg: int(tensor.shape[0]), in_arg: int(tensor.shape[1]) * groups}


def sizes_in_state_dict(
    network: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> dict[str, dict[str, int]]:
    """Widths of ``network``'s resizable modules whose tensors in ``state_dict`` (keys under ``prefix``) have
    another shape: what ``apply_sizes`` needs to make ``network`` hold a compacted checkpoint."""
    sizes = {}
    for name, module in network.named_modules():
        if type(module) not in RESIZABLE:
            continue
        for tensor_name in ("weight", "running_mean"):
            own = getattr(module, tensor_name, None)
            theirs = state_dict.get(f"{prefix}{name}.{tensor_name}")
            if isinstance(own, Tensor) and theirs is not None:
                if theirs.shape != own.shape:
                    sizes[name] = _widths(module, theirs)
                break
    return sizes


def adopt_sizes(network: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> None:
    """Give ``network``'s modules the widths ``sizes`` where they differ (uninitialised: weights load next)."""
    for name, widths in sizes.items():
        module = network.get_submodule(name)
        arguments = RESIZABLE[type(module)][0](module)
        if all(arguments[key] == value for key, value in widths.items()):
            continue
        new = resized(name, module, widths)
        if _channels_last(module):
            new.to(memory_format=torch.channels_last)
        replace_module(network, name, new)
    log.info("network rebuilt at its cut widths: %s", dict(sizes))
