"""Folds: a residual or a gate whose one side is a single conv's (or linear layer's) output that nothing else
reads, and whose other side carries several spaces — Inception-ResNet's ``conv(x) * 0.17 + x`` after a
concatenation, a squeeze-and-excitation gate on a concatenation (CSPNeXt, GhostNet). The conv's channel c meets
the other side's channel c, which belongs to one of several spaces, so the conv cannot join them as one space of its
own. Its rows (and its norm's entries) are instead cut with the channels they meet: a ``ChannelPoint`` of each of
those spaces, as a depthwise conv carrying several spaces is, and masked at its output, so that a masked channel
is zero on both sides (a sum or a product of zeros is zero). Its own space leaves the graph."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import add_points
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

MAX_STEPS = 8  # ops between the conv and the join (its norm, an activation, a scale by a number, a gate)


def fold(tracer: Tracer, node: torch.fx.Node, product: bool) -> Value | None:
    """The join's output where one operand is a foldable conv's and the other carries several spaces; None where
    neither is (the caller joins or refuses them as before)."""
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    values = [tracer.values.get(a) for a in operands]
    if len(operands) != 2 or not all(isinstance(value, Value) for value in values):
        return None
    for (single, source), other in (((values[0], operands[0]), values[1]), ((values[1], operands[1]), values[0])):
        if other.layout is None and len(other.segments) < 2:
            continue
        layer = foldable(tracer, single, source, other)
        if layer is None:
            continue
        shape = (other.width,) if other.channels_last else (1, other.width, *([1] * (other.ndim - 2)))
        for name, module in ((layer.name, layer.producer), (layer.norm_name, layer.norm)):
            if name is not None and module is not None:
                add_points(tracer, name, module, other, shape)
        tracer.folded.add(tracer.union_find.root(single.segments[0][0]))
        revived = (single.revived_by and other.revived_by) if product else (single.revived_by or other.revived_by)
        return replace(other, revived_by=revived)
    return None


def foldable(tracer: Tracer, single: Value, source: torch.fx.Node, other: Value) -> PrunableLayer | None:
    """The conv whose output ``single`` is, if its rows can follow ``other``'s channels: one whole space of one
    dense conv (or linear layer), read by nothing but the ops leading here, at ``other``'s width and dim."""
    if not one_whole_space(single) or single.flattened or other.flattened or other.width is None:
        return None
    if single.channels_last != other.channels_last or (other.ndim is None and not other.channels_last):
        return None
    if single.width != other.width and tracer.widths is None:
        return None
    layer = sole_writer(tracer, source)
    space = tracer.space(single.segments[0][0])
    if layer is None or space.producers != [layer] or space.consumers or space.points or space.scales:
        return None
    if space.coupled or not space.prunable or space.heads > 1 or getattr(layer.producer, "groups", 1) > 1:
        return None
    if isinstance(layer.producer, nn.Linear) != other.channels_last:
        return None
    names = (layer.name, layer.norm_name)
    return None if any(name is not None and tracer.reused(name) for name in names) else layer


def sole_writer(tracer: Tracer, node: torch.fx.Node) -> PrunableLayer | None:
    """The producer whose output reaches ``node`` through ops of one tensor input each, every output on the way
    read once (by the next op): what a fold may cut without another reader noticing."""
    for _ in range(MAX_STEPS):
        if len(node.users) != 1:
            return None
        if node in tracer.writer_of:
            return tracer.writer_of[node]
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None
