"""Grouped convs with a channel multiplier: groups = in channels, out = k · in (FastViT's downsampling
``large_conv``/``small_conv``, PiT's pooling conv). Output channels c·k … c·k + k − 1 read input channel c alone, so
cutting input channel c with those k outputs is exact, and the conv stays one of groups = in channels at the cut
width. Its output space is written at k channels per channel of the space it reads: at the end of the walk it is
**expanded into** that one (``expand_spaces``) — its producers' rows and norms' entries become points of it, k
entries per channel (``ChannelPoint.per_channel``), its readers read k columns per channel
(``Consumer.features_per_channel``) — and leaves the graph, as a fold's space does. Where it cannot be (read
reordered, at an offset, scaled by a parameter or in groups of its own), both spaces are refused, naming the conv."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.layers import channel_multiplier, output_ndim
from pruneflow.graph.records import ChannelSpace, PrunableLayer
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def multiplier(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A conv with a channel multiplier reading one whole space in order, at dim 1: it writes a space of its own,
    recorded to be expanded into the one it reads; None (the caller reads it as any grouped conv) otherwise."""
    name = str(node.target)
    single = one_whole_space(value) and not value.flattened and value.channels_at(1) and value.revived_by is None
    single = single and tracer.fits(value.width, module.in_channels)
    if not single or not tracer.fits(tracer.space(value.segments[0][0]).width, value.width) or tracer.reused(name):
        return None
    layer = PrunableLayer(name, module)
    index = tracer.new_space(layer)
    tracer.writer_of[node] = layer
    tracer.multiplied.append((value.segments[0][0], index, channel_multiplier(module), name))
    return Value(((index, 0),), tracer.width(layer), ndim=output_ndim(module))


def expand_spaces(tracer: Tracer) -> None:
    """Each multiplier's output space into the space it reads, the last recorded first (PiT's pooling convs in a
    chain: a later stage's space goes into the earlier one's, then both into the first)."""
    expanded: dict[int, tuple[ChannelSpace, int]] = {}  # a space written by several (FastViT's large and small conv)
    for inner_index, outer_index, k, name in reversed(tracer.multiplied):
        inner, outer, root = tracer.space(inner_index), tracer.space(outer_index), tracer.union_find.root(outer_index)
        if root in expanded and expanded[root][0] is inner and expanded[root][1] == k:
            continue  # its rows are points already, with the other writers'
        if root in tracer.folded or root in expanded:  # embedded in another space, or written from two at once
            earlier = [expanded[root][0]] if root in expanded else []
            for space in (inner, outer, *earlier):
                space.refuse(f"grouped conv {name} writes each channel {k} times into channels of another space")
            continue
        expanded[root] = (inner, k)
        reason = "its output is joined with its input" if inner is outer else unexpandable(outer)
        if any(tracer.space(read) is outer for _, read, _ in tracer.ties):
            reason = "an attention's head width follows its output"
        if reason:
            for space in (inner, outer):
                space.refuse(f"grouped conv {name} writes each channel {k} times, and {reason}")
            continue
        inner.points += outer.producers_as_points(per_channel=k)
        inner.consumers += [replace(c, features_per_channel=c.features_per_channel * k) for c in outer.consumers]
        inner.points += [replace(point, per_channel=point.per_channel * k) for point in outer.points]
        inner.scales += [replace(scale, per_channel=scale.per_channel * k) for scale in outer.scales]
        inner.refusals += [reason for reason in outer.refusals if reason not in inner.refusals]
        inner.coupled = True
        tracer.folded.add(tracer.union_find.root(outer_index))


def unexpandable(space: ChannelSpace) -> str | None:
    """Why ``space``'s readers and writers cannot follow k entries per channel of the space it is expanded into."""
    if space.groups > 1 or space.heads > 1 or space.tied or space.tied_to is not None or space.whole_heads:
        return "its output is cut in groups or heads"
    if space.block > 1 or space.multiple > 1:
        return "its output is normalised in groups or read by attentions in heads"
    if space.sources or space.splits or space.held_by:
        return "its output is written or split by a parameter or an attribute"
    if any(scale.at or scale.offset for scale in space.scales):
        return "its output is scaled beside other channels"
    if any(c.at or c.offset or c.kind == "grouped" for c in space.consumers):
        return "its output is read grouped, reordered or beside other channels"
    if any(point.at or point.offset for point in space.points):
        return "its output is normalised reordered or beside other channels"
    return None
