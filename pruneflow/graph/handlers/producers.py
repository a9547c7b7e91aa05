"""Producers and consumers: convs and linear layers write a new space (their output rows) and read the spaces
of their input (their input columns). A depthwise conv reading one whole space carries channel c to its own
channel c: a producer of that space, not of a new one; reading several spaces it is a point of each."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.multipliers import multiplier
from pruneflow.graph.layers import PRODUCER_TYPES, channel_multiplier, is_depthwise, output_ndim
from pruneflow.graph.records import ChannelPoint, Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def producer(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """A conv or linear layer: it reads its input's spaces (a consumer of each) and writes a space of its own."""
    if is_depthwise(module):
        return depthwise(tracer, node, module, value)
    multiplied = multiplier(tracer, node, module, value) if channel_multiplier(module) > 1 else None
    if multiplied is not None:
        return multiplied
    if along_positions(module, value):
        return mixing_positions(tracer, node, module, value)
    name = str(node.target)
    layer = PrunableLayer(name, module)
    read(tracer, name, module, value)
    index = tracer.new_space(layer)
    if getattr(module, "groups", 1) > 1:
        tracer.spaces[index].groups = module.groups
    if tracer.reused(name):
        tracer.spaces[index].refuse(tracer.reused(name))
    tracer.writer_of[node] = layer
    if isinstance(module, nn.Linear):  # its features are the last dim of a tensor of its input's rank
        return Value(((index, 0),), tracer.width(layer), ndim=value.ndim if value else None, channels_last=True)
    return Value(((index, 0),), tracer.width(layer), ndim=output_ndim(module))


def along_positions(module: nn.Module, value: Value | None) -> bool:
    """Whether a linear layer reads ``value`` along a dim of positions (its channels at another dim, known), or a
    conv of kernel 1 reads channels-last tokens (B, tokens, C) with their tokens as its input channels and their
    channels as its length (CoaT's ``aggregate`` of its scales' class tokens, stacked)."""
    if value is None or value.flattened or value.probe is not None or value.ndim is None:
        return False
    if isinstance(module, nn.Linear):
        return not value.channels_last and value.ndim >= 3 and value.channels_at(1)
    kernel_one = isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.stride == (1,)
    return kernel_one and module.padding in ((0,), "valid") and value.channels_last and value.ndim == 3


def mixing_positions(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value) -> Value:
    """A linear layer over the positions of each channel on its own (gMLP's spatial gating ``proj`` over the tokens of
    ``v.transpose(-1, -2)``, MLP-Mixer's token MLP), or a conv of kernel 1 along the channels: channel c of its output
    is computed from channel c alone, so it carries its input's spaces where they are; its bias turns a masked
    channel's 0 into the bias. Its own outputs are positions, not a channel space: it is not cut. The conv over
    stacked tokens (CoaT's ``aggregate``, read by the classifier) is masked again at its output instead, a point of
    the one space it reads that holds no entry of it (``ChannelPoint.entries``)."""
    revived = value.revived_by or (f"{node.target}'s bias" if module.bias is not None else None)
    if isinstance(module, nn.Conv1d) and revived and value.revived_by is None and one_whole_space(value):
        point = ChannelPoint(str(node.target), module, 0, (value.width,), entries=False)
        tracer.space(value.segments[0][0]).points.append(point)
        return value
    return replace(value, revived_by=revived)


def depthwise(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """A depthwise conv reading one whole space joins it as a producer; reading several it is a point of each
    (``carried``); reading anything else it writes a space of its own, refused, and refuses what it reads."""
    name = str(node.target)
    layer = PrunableLayer(name, module)
    # one space, whole and in order: a shuffled space or one part of a split is carried position by position
    single = one_whole_space(value) and tracer.fits(value.width, module.in_channels)
    single = single and tracer.fits(tracer.space(value.segments[0][0]).width, value.width)
    single = single and not value.flattened and value.channels_at(1)
    if single and value.revived_by is None and not tracer.reused(name):
        ((index, _),) = value.segments
        tracer.space(index).producers.append(layer)  # it carries channel c to its own channel c
        tracer.writer_of[node] = layer
        return Value(value.segments, value.width, ndim=output_ndim(module))
    carried_value = carried(tracer, node, module, value)
    if carried_value is not None:
        return carried_value
    index = tracer.new_space(layer)
    tracer.spaces[index].refuse(f"depthwise conv {name} reads a tensor that is not one whole channel space")
    tracer.refuse(value, f"depthwise conv {name} reads them along with other channels")
    return Value(((index, 0),), tracer.width(layer), ndim=output_ndim(module))


def carried(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A depthwise conv reading several spaces (a concatenation, a shuffled stream) carries each channel to its
    own channel: it is a ``ChannelPoint`` of each (its rows cut with the channels, its output masked, as it may
    add a bias), not a producer of a space of its own. None if it reads anything else."""
    name = str(node.target)
    if (
        value is None
        or not tracer.fits(value.width, module.in_channels)
        or value.flattened
        or not value.channels_at(1)
        or value.revived_by is not None
        or tracer.reused(name)
        or (value.layout is None and len(value.segments) < 2)
    ):
        return None
    ndim = output_ndim(module)
    shape = (1, module.out_channels, *([1] * (ndim - 2)))
    add_points(tracer, name, module, value, shape)
    return replace(value, ndim=ndim)


def add_points(tracer: Tracer, name: str, module: nn.Module, value: Value, shape: tuple[int, ...]) -> None:
    """``module`` (a norm, a depthwise conv) as a ``ChannelPoint`` of every space ``value`` carries."""
    if value.layout is None:
        for index, offset in value.segments:
            tracer.space(index).points.append(ChannelPoint(name, module, offset, shape))
        return
    for index, at in tracer.positions(value.layout).items():
        tracer.space(index).points.append(ChannelPoint(name, module, 0, shape, at=at))


def read(tracer: Tracer, name: str, module: nn.Module, value: Value | None) -> None:
    """Record ``module`` as a consumer of every space in ``value``, or refuse those spaces."""
    if value is None:
        return
    reason = tracer.reused(name)
    if reason:
        tracer.refuse(value, f"their reader {reason if reason.startswith(name) else f'{name}: {reason}'}")
        return
    if value.revived_by is not None:
        tracer.refuse(value, f"{value.revived_by} turns a masked channel's 0 into f(0) ≠ 0 before {name} reads it")
        return
    if getattr(module, "groups", 1) > 1:
        read_grouped(tracer, name, module, value)
        return
    linear = isinstance(module, nn.Linear)
    width = module.in_features if linear else module.in_channels
    kind = "linear" if linear else "conv"
    if value.layout is not None:
        if value.flattened or not (value.channels_at(-1) if linear else value.channels_at(1)):
            tracer.refuse(value, f"{name} reads them along another dimension than their channels")
            return
        for index, at in tracer.positions(value.layout).items():
            tracer.space(index).consumers.append(Consumer(name, kind, at=at))
        return
    per_channel = 1
    if value.flattened:
        if not linear or value.width is None or width % value.width:
            tracer.refuse(value, f"{name} reads them flattened in a layout the graph does not follow")
            return
        per_channel = width // value.width
    if not (value.read_by_linear if linear else value.channels_at(1) and not value.flattened):
        tracer.refuse(value, f"{name} reads them along another dimension than their channels")
        return
    for index, offset in value.segments:
        tracer.space(index).consumers.append(Consumer(name, kind, per_channel, offset))


def read_grouped(tracer: Tracer, name: str, module: nn.Module, value: Value) -> None:
    """A grouped conv reads one whole space, cut at the same positions in each of its groups, or one part of a split
    whose sizes the cut sets (Res2Net's), the whole space then cut at the same positions in each of its blocks."""
    if value.layout is not None and read_grouped_part(tracer, name, module, value):
        return
    if value.layout is not None:  # its columns are cut by position in each group: the shuffle's order is lost
        reason = f"grouped conv {name} (groups={module.groups}) reads them reordered (a shuffle or a split)"
        tracer.refuse(value, reason)
        return
    whole = len(value.segments) == 1 and tracer.fits(value.width, module.in_channels) and not value.flattened
    if not whole or not value.channels_at(1):
        tracer.refuse(value, f"grouped conv {name} (groups={module.groups}) reads them with other channels")
        return
    ((index, _),) = value.segments
    space = tracer.space(index)
    space.groups = tracer.joined_groups(space, module.groups, f"grouped conv {name}")
    space.consumers.append(Consumer(name, "grouped", block=module.in_channels // module.groups))


register_module_handler(PRODUCER_TYPES, producer, leaf=False)


def read_grouped_part(tracer: Tracer, name: str, module: nn.Module, value: Value) -> bool:
    """A grouped conv reading a run of one space's channels, in order, at a multiple of its group's width (a part of
    a split the cut keeps in order): its group g reads block g of the run, so the space is cut at the same positions
    in each block of that width, and the conv's columns are those positions. False for anything else."""
    block = module.in_channels // module.groups
    index, start = value.layout[0]
    run = tuple((index, start + c) for c in range(len(value.layout)))
    space = tracer.space(index)
    if value.by_position or value.layout != run or start % block or not tracer.fits(value.width, module.in_channels):
        return False
    if value.flattened or not value.channels_at(1) or space.width % block:
        return False
    space.groups = tracer.joined_groups(space, space.width // block, f"grouped conv {name}")
    space.consumers.append(Consumer(name, "grouped", block=block))
    return True
