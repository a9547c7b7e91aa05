"""Joins: an addition or a product of two spaces couples them (a residual, a squeeze-and-excitation scale: a sum
or product of zeros is zero, so both are pruned as one space); a product with a number or a per-channel parameter
keeps a zero channel at zero (ConvNeXt's layer scale, cut with the channels); a concatenation along the channels
places spaces side by side, each at its offset."""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph.handlers.folds import fold
from pruneflow.graph.handlers.gates import paired
from pruneflow.graph.handlers.slices import embedded
from pruneflow.graph.layers import LAYER_NORMS, NORM_TYPES, PRODUCER_TYPES
from pruneflow.graph.nodes import argument
from pruneflow.graph.parameters import attribute
from pruneflow.graph.records import ChannelScale
from pruneflow.graph.registry import register_function_handler, register_method_handler
from pruneflow.graph.values import UNKNOWN, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub)
MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)


def add(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    """A sum or a difference (PoolFormer's ``pool(x) - x``): zero plus or minus zero is zero."""
    return elementwise(tracer, node, product=False)


def divide(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x / n`` for a number n keeps a zero channel at zero (RepViT's two heads averaged); by a tensor: unknown."""
    divisor = argument(node, 1, "other", None)
    if isinstance(value, Value) and isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
        return value
    return UNKNOWN


def multiply(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    return elementwise(tracer, node, product=True)


def elementwise(tracer: Tracer, node: torch.fx.Node, product: bool) -> Value | None:
    """Two values of one whole space each are joined into one space; a product with a number or a per-channel
    parameter keeps the value; anything else is a tensor outside the graph: refused."""
    operands = [*node.args, *node.kwargs.values()]
    tensors = [tracer.values.get(a) if isinstance(a, torch.fx.Node) else a for a in operands]
    values = [v for v in tensors if isinstance(v, Value)]
    numbers = [v for v in tensors if isinstance(v, (int, float)) and not isinstance(v, bool)]
    description = tracer.describe(node)
    if product and len(values) == 1 and len(numbers) == len(tensors) - 1:
        return values[0]  # a number times zero is zero
    if not product and len(values) == 1 and len(numbers) == len(tensors) - 1:  # MobileOne's ``x + 0``
        return values[0] if not any(numbers) else replace(values[0], revived_by=description)
    factors = [a for a in operands if isinstance(a, torch.fx.Node) and parameter_read(a) is not None]
    if product and len(values) == 1 and len(tensors) == 2 and factors and scaled(tracer, values[0], factors[0]):
        return values[0]  # a per-channel parameter times zero is zero
    result = fold(tracer, node, product) if len(values) == len(tensors) == 2 else None
    if result is None and len(values) == len(tensors) == 2:  # a product too: a gate times copies is zero at zero
        result = embedded(tracer, values, product)
    if result is None and len(values) == len(tensors) == 2:  # two parts of one layer's rows, channel for channel
        result = paired(tracer, description, values, product)
    if result is not None:
        return result
    pairs = lined_up(tracer, values) if len(values) == len(tensors) == 2 else None
    if pairs is None:
        reason = f"{description} combines them with a tensor outside the channel graph"
        if len(values) == len(tensors) == 2:  # both in the graph: parts or reorderings that do not line up
            reason = (f"{description} joins channels that do not line up (parts of a layer's rows, as a gate "
                      "multiplies one part by another: a cut would not keep them paired)")  # fmt: skip
        for value in values:
            tracer.refuse(value, reason)
        return None
    a, b = values
    segments = tuple((tracer.union(i, j, description), offset) for i, j, offset in pairs)
    # zero times anything is zero: a product is revived only if both factors are
    revived = (a.revived_by and b.revived_by) if product else (a.revived_by or b.revived_by)
    return Value(segments, a.width, revived_by=revived, ndim=a.ndim or b.ndim, channels_last=a.channels_last)


def lined_up(tracer: Tracer, values: list[Value]) -> list[tuple[int, int, int]] | None:
    """The spaces of two values that meet channel for channel, (one, the other, offset): whole spaces at the same
    offsets, of equal widths, filling both (one space each, or GhostNet's residual of ``[x1, cheap(x1)]`` copies
    added to the block's input, copies too); None where they do not."""
    a, b = values
    if a.channels_last != b.channels_last or a.width != b.width or a.flattened or b.flattened:
        return None
    if len(a.segments) == len(b.segments) == 1 and a.segments[0][1] == b.segments[0][1] == 0:
        return [(a.segments[0][0], b.segments[0][0], 0)]
    if len(a.segments) != len(b.segments) or a.layout is not None or b.layout is not None:
        return None
    pairs = [(i, j, at) for (i, at), (j, other) in zip(a.segments, b.segments, strict=True) if at == other]
    widths = [tracer.space(i).width for i, _, _ in pairs]
    starts = [sum(widths[:k]) for k in range(len(widths))]
    if len(pairs) != len(a.segments) or [at for _, _, at in pairs] != starts or sum(widths) != a.width:
        return None
    return pairs if all(tracer.space(j).width == w for (_, j, _), w in zip(pairs, widths, strict=True)) else None


def parameter_read(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``get_attr`` that ``node`` is, or that it reshapes to broadcast (timm's ConvNeXt:
    ``x.mul(self.gamma.reshape(1, -1, 1, 1))``, read by nothing else); None for anything else."""
    if node.op == "get_attr":
        return node
    source = node.args[0] if node.args else None
    reshaping = node.op == "call_method" and node.target in ("reshape", "view")
    if reshaping and isinstance(source, torch.fx.Node) and source.op == "get_attr" and len(source.users) == 1:
        return source
    return None


def broadcast_shape(tracer: Tracer, factor: torch.fx.Node, parameter: nn.Parameter) -> tuple[int, ...] | None:
    """The shape the factor multiplies with: the parameter's, or a 1-D parameter's after its reshape."""
    if factor.op == "get_attr":
        return tuple(parameter.shape)
    sizes = factor.args[1] if len(factor.args) == 2 else factor.args[1:]
    if parameter.ndim != 1 or not all(isinstance(size, int) for size in sizes):
        return None
    try:
        return tuple(torch.empty(parameter.shape, device="meta").reshape(sizes).shape)
    except RuntimeError:
        return None


def scaled(tracer: Tracer, value: Value, factor: torch.fx.Node) -> bool:
    """Whether ``factor`` (a ``get_attr``, or its reshape) is a parameter of one entry per channel along
    ``value``'s channels (ConvNeXt's ``layer_scale``, (C, 1, 1)), read once, of no producer or norm; if so each
    space records it (``ChannelScale``), to be cut with its channels."""
    source = parameter_read(factor)
    target = str(source.target)
    parameter = attribute(tracer.model, target)
    owner = tracer.modules.get(target.rpartition(".")[0])
    shape = broadcast_shape(tracer, factor, parameter) if isinstance(parameter, nn.Parameter) else None
    if (
        shape is None
        or value.layout is not None
        or isinstance(owner, (*PRODUCER_TYPES, *NORM_TYPES, *LAYER_NORMS))
        or tracer.attribute_reads.get(target, 0) != 1
        or value.flattened
        or value.width is None
        or (value.ndim is None and not value.channels_last)
        or (value.ndim is not None and len(shape) > value.ndim)
    ):
        return False
    dim = len(shape) - 1 if value.channels_last else len(shape) - value.ndim + 1
    others = [size for d, size in enumerate(shape) if d != dim]
    if dim not in (0, 1) or dim >= len(shape) or shape[dim] != value.width or set(others) - {1}:
        return False
    for index, offset in value.segments:  # a reshaped 1-D parameter: its channels are its dim 0
        tracer.space(index).scales.append(ChannelScale(target, dim if factor is source else 0, offset))
    return True


def cat(tracer: Tracer, node: torch.fx.Node, value: Any) -> Value | None:
    """Spaces side by side along the channels, each at its offset (its positions, where one is reordered)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = argument(node, 1, "dim", 0)
    values = [tracer.values.get(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    known = [value for value in values if value is not None]
    if not isinstance(dim, int) or not all(value.channels_at(dim) for value in known):
        tracer.refuse_unknown(node, values)
        return None
    if any(value is not None and value.layout is not None for value in values):
        return cat_layouts(tracer, node, values)
    segments: list[tuple[int, int]] = []
    offset: int | None = 0
    revived = None
    ndim = next((value.ndim for value in values if value is not None), None)
    for value in values:
        if value is None:
            offset = None
            continue
        if value.flattened:
            tracer.refuse_unknown(node, [value])
            offset = None
            continue
        revived = revived or value.revived_by
        if offset is None:
            tracer.refuse(value, f"{tracer.describe(node)} places them after a tensor of unknown width")
            continue
        segments += [(index, offset + inner) for index, inner in value.segments]
        offset = None if value.width is None else offset + value.width
    if not segments:
        return None
    return Value(tuple(segments), offset, revived_by=revived, ndim=ndim, channels_last=known[0].channels_last)


def cat_layouts(tracer: Tracer, node: torch.fx.Node, values: list[Value | None]) -> Value | None:
    """A concatenation of reordered spaces: their layouts one after the other."""
    layouts = [tracer.layout_of(value) if value is not None else None for value in values]
    if any(layout is None for layout in layouts):
        for value in values:
            if value is not None:
                tracer.refuse(value, f"{tracer.describe(node)} places them beside a tensor of unknown channels")
        return None
    first = next(value for value in values if value is not None)
    revived = next((value.revived_by for value in values if value is not None and value.revived_by), None)
    joined = [position for layout in layouts for position in layout]  # type: ignore[union-attr]
    by_position = any(value.by_position for value in values if value is not None)
    return tracer.with_layout(first, joined, by_position, revived_by=revived)


register_function_handler(ADD_FUNCTIONS, add)
register_function_handler(MUL_FUNCTIONS, multiply)
register_method_handler(("add", "add_", "sub", "sub_"), add)
register_function_handler((operator.truediv, torch.div, torch.true_divide), divide)
register_method_handler(("div", "div_", "truediv"), divide)
register_method_handler(("mul", "mul_"), multiply)
register_function_handler(torch.cat, cat)
