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
from pruneflow.graph.records import ChannelScale, ChannelSpace
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


# functions of a parameter's entries one by one: a per-channel parameter through them is still one per channel
ELEMENTWISE = (torch.sigmoid, torch.exp, torch.tanh, "sigmoid", "exp", "tanh")


def parameter_steps(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The ops from a ``get_attr`` read by nothing else to ``node``, first the ``get_attr``: reshapes, integer or
    slice indexing and entry-wise functions of the parameter alone (ConvNeXt's ``self.gamma.reshape(1, -1, 1, 1)``,
    EfficientViM's ``torch.sigmoid(self.alpha).view(4, -1, 1, 1)[k]``); None for anything else."""
    steps = [node]
    while steps[0].op != "get_attr":
        step = steps[0]
        source = step.args[0] if step.args else None
        entrywise = step.target in ELEMENTWISE and len(step.args) == 1 and not step.kwargs
        known = entrywise or step.target is operator.getitem or step.target in ("reshape", "view")
        if step.op == "call_module" or not known or not isinstance(source, torch.fx.Node):
            return None
        steps.insert(0, source)
    return steps if len(steps) == 1 or len(steps[0].users) == 1 else None


def parameter_read(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``get_attr`` that ``node`` is, or that it reaches (``parameter_steps``); None for anything else."""
    steps = parameter_steps(node)
    return None if steps is None else steps[0]


def parameter_entries(steps: list[torch.fx.Node], parameter: nn.Parameter) -> torch.Tensor | None:
    """What the factor at the end of ``steps`` multiplies with, as the index of each of its values among the
    parameter's entries (flattened); None where a step's sizes or indices are not constants."""
    entries = torch.arange(parameter.numel()).reshape(parameter.shape)
    for step in steps[1:]:
        if step.target in ELEMENTWISE:  # entry by entry: the indices stay
            continue
        arguments = step.args[1] if len(step.args) == 2 else step.args[1:]
        items = arguments if isinstance(arguments, tuple) else (arguments,)
        if not all(isinstance(item, (int, slice, type(None))) for item in items):
            return None
        try:
            entries = entries[arguments] if step.target is operator.getitem else entries.reshape(arguments)
        except (RuntimeError, IndexError, TypeError):
            return None
    return entries


def scaled(tracer: Tracer, value: Value, factor: torch.fx.Node) -> bool:
    """Whether ``factor`` (a parameter, or what ``parameter_steps`` make of it) holds one entry of a parameter per
    channel along ``value``'s channels (ConvNeXt's ``layer_scale``, (C, 1, 1)), along one of its first two dims,
    read once, of no producer or norm; if so each space records it (``ChannelScale``), to be cut with its channels."""
    steps = parameter_steps(factor)
    target = str(steps[0].target)
    parameter = attribute(tracer.model, target)
    owner = tracer.modules.get(target.rpartition(".")[0])
    entries = parameter_entries(steps, parameter) if isinstance(parameter, nn.Parameter) else None
    shape = None if entries is None else tuple(entries.shape)
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
    if dim not in range(len(shape)) or shape[dim] != value.width or set(others) - {1}:
        return False
    # each channel's entry, as coordinates in the parameter: the channels must run along all of one of its first two
    # dims, in order (a cut of that dim is then a cut of the factor, whatever else indexes it: ``alpha[k]``)
    coordinates = torch.stack(torch.unravel_index(entries.flatten(), parameter.shape))
    along = [d for d in (0, 1) if d < parameter.ndim and coordinates[d].tolist() == list(range(parameter.shape[d]))]
    if not along:
        return False
    for index, offset in value.segments:
        tracer.space(index).scales.append(ChannelScale(target, along[0], offset))
    return True


def refuse_shared_scales(spaces: list[ChannelSpace]) -> None:
    """A per-channel parameter whose same entries scale several spaces that stay apart (one gate parameter read
    for two streams): a cut of one would cut the other's entries, so both are refused, naming it."""
    holders: dict[str, dict[int, ChannelSpace]] = {}
    for space in spaces:
        for scale in space.scales:
            entries = holders.setdefault(f"{scale.name} along {scale.dim}", {})
            for entry in scale.channels(torch.arange(space.width)).tolist():
                other = entries.setdefault(entry, space)
                if other is not space:
                    for held in (space, other):
                        held.refuse(f"parameter {scale.name} scales the channels of several spaces that stay apart")


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
