"""Reorderings of the channels: ``chunk``/``split`` along them (each part carries its positions of the layout) and
reshapes (a channel shuffle: ``view`` to (N, groups, C/groups, H, W), ``transpose``, ``view`` back), followed on a
**probe**, a small tensor of channel indices that goes through the same ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph.handlers.shapes import probe_shape, resolved
from pruneflow.graph.handlers.slices import held_by, sizes_set_by_the_cut
from pruneflow.graph.nodes import argument
from pruneflow.graph.registry import SPLIT_SIZES, SplitResize, register_function_handler, register_method_handler
from pruneflow.graph.values import Parts, Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

# Ops a reshape probe goes through: they move elements without computing on them.
RESHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "swapaxes"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.swapaxes}


def reshaping(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in RESHAPE_METHODS
    return node.op == "call_function" and node.target in RESHAPE_FUNCTIONS


def split_sizes(node: torch.fx.Node, width: int) -> list[int] | None:
    """The widths of the parts ``chunk``/``split`` cuts ``width`` channels into; None if they are not known."""
    sections = argument(node, 1, "split_size_or_sections" if "split" in str(node.target) else "chunks", None)
    if node.target in ("split", torch.split) and "split_size" in node.kwargs:
        sections = node.kwargs["split_size"]
    if node.target in ("chunk", torch.chunk):
        if not isinstance(sections, int) or sections < 1:
            return None
        size = -(-width // sections)
        return [min(size, width - start) for start in range(0, width, size)]
    if isinstance(sections, int) and sections > 0:
        return [min(sections, width - start) for start in range(0, width, sections)]
    if isinstance(sections, (list, tuple)) and all(isinstance(n, int) for n in sections) and sum(sections) == width:
        return list(sections)
    return None


def split(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Parts | None:
    """``chunk``/``split`` along the channels: each part carries its positions of the layout. A split the graph
    cannot follow (of unknown sizes, along another dim, of a tensor of unknown layout) refuses what it splits."""
    if value is None:
        return None
    dim = argument(node, 2, "dim", 0)
    layout = tracer.layout_of(value)
    sizes = None
    if layout is not None and isinstance(dim, int) and value.channels_at(dim):
        sizes = split_sizes(node, len(layout))
    if sizes is None:
        return split_by_position(tracer, node, value)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    by_position = not sizes_set_by_the_cut(tracer, node, value, sizes)
    owner = held_by(tracer, node)
    equal_parts = isinstance(SPLIT_SIZES.get(type(tracer.modules.get(owner, tracer.model))), EqualParts)
    if not by_position and equal_parts and len(set(sizes)) > 1:  # EdgeNeXt's chunk of 88 channels into 3 scales
        tracer.refuse(value, f"{tracer.describe(node)} splits them into unequal parts {sizes}, cut in step by no rule")
    elif not by_position and equal_parts:
        space = tracer.space(value.segments[0][0])  # cut at the same positions in every part: they stay equal
        space.groups = tracer.joined_groups(space, len(sizes), f"{tracer.describe(node)} into equal parts")
    # equal parts of one space: by position unless a gate pairs them (``gates.settle_chunks`` decides at the end)
    equal = by_position and one_whole_space(value) and len(sizes) > 1 and len(set(sizes)) == 1
    if equal:
        tracer.chunks.append((value.segments[0][0], len(sizes)))
    by_position = by_position and not equal
    parts = (tracer.with_layout(value, layout[a : a + n], by_position) for a, n in zip(starts, sizes, strict=True))
    return Parts(tuple(parts))


def sizes_in(*attributes: str) -> SplitResize:
    """A split by a list of sizes, each held in one of ``attributes`` (FasterNet's ``[dim_conv3, dim_untouched]``)."""

    def resize(module: nn.Module, sizes: Sequence[int]) -> dict[str, int]:
        return dict(zip(attributes, sizes, strict=True))

    return resize


class EqualParts:
    """A split by ``x.split(self.<attribute>)`` into parts of one size (Res2Net's ``width``), or by ``attribute //
    parts`` (``whole``: SKNet's ``in_channels // num_paths``): every part keeps as many channels as the others, so the
    graph cuts the split space at the same positions in each part."""

    def __init__(self, attribute: str, whole: bool = False) -> None:
        self.attribute, self.whole = attribute, whole

    def __call__(self, module: nn.Module, sizes: Sequence[int]) -> dict[str, int]:
        if len(set(sizes)) != 1:
            raise ValueError(f"{self.attribute} sizes every part, so each must keep as many channels, not {sizes}")
        return {self.attribute: sum(sizes) if self.whole else sizes[0]}


def sizes_held_in(attribute: str) -> SplitResize:
    """A split by a tuple of sizes held in one attribute (InceptionNeXt's ``split_indexes``)."""

    def resize(module: nn.Module, sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
        return {attribute: tuple(sizes)}

    return resize


def halves_of(attribute: str) -> SplitResize:
    """A split by ``x.split(self.<attribute> // 2)`` (CSPNet's ``expand_chs``): parts of ``attribute // 2`` channels,
    so two parts only while the second keeps no more than the first."""

    def resize(module: nn.Module, sizes: Sequence[int]) -> dict[str, int]:
        if len(sizes) != 2 or sizes[1] > sizes[0]:
            raise ValueError(f"{attribute} // 2 channels go first, so the second part cannot keep more")
        return {attribute: 2 * sizes[0]}

    return resize


def first_size_in(attribute: str, whole: str | None = None) -> SplitResize:
    """Parts at a position held in ``attribute`` (RexNet's ``x[:, 0:in_channels]``, ``x[:, in_channels:]``): the
    first part's size; and the width of all parts in ``whole``, where one holds it (SHViT's ``split(x, [pdim, dim -
    pdim])``)."""

    def resize(module: nn.Module, sizes: Sequence[int]) -> dict[str, int]:
        return {attribute: sizes[0], **({whole: sum(sizes)} if whole else {})}

    return resize


def split_by_position(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> None:
    """A split the graph does not follow (``unbind``, ``tensor_split``): every space it reads is refused."""
    for part in tracer.input_values(node):
        tracer.refuse(part, f"{tracer.describe(node)} splits them by position")


def probed(tracer: Tracer, node: torch.fx.Node, value: Value) -> Value | None:
    """A reshape of channels followed on a probe: a tensor of channel indices with distinct primes for the other
    dims goes through the same ops. Where every index along dim 1 or the last dim holds one channel, and all
    channels appear, the channels are readable again, reordered; until then only another reshape may read it."""
    layout = tracer.layout_of(value) if value.probe is None else value.layout
    shape = probe_shape(value) if value.probe is None else None
    if layout is None or (value.probe is None and shape is None):
        tracer.refuse_unknown(node, [value])
        return None
    probe = value.probe if value.probe is not None else start_probe(value, layout, shape)
    result = reshaped(tracer, node, probe)
    if result is None:
        tracer.refuse_unknown(node, [value])
        return None
    for dim in (1, result.ndim - 1) if result.ndim >= 2 else ():
        rows = result.movedim(dim, 0).reshape(result.shape[dim], -1)
        order = rows[:, 0]
        one_channel_each = len(order) == len(layout) and bool((rows == order[:, None]).all())
        if one_channel_each and bool((order.sort().values == torch.arange(len(layout))).all()):
            moved = [layout[int(i)] for i in order]
            # moved to another dim in their order (gMLP's ``v.transpose(-1, -2)``): placed as they were
            by_position = value.by_position if tuple(moved) == layout and value.layout is not None else True
            last = dim == result.ndim - 1 > 1
            return tracer.with_layout(value, moved, by_position, ndim=result.ndim, channels_last=last)
    return replace(value, layout=layout, probe=result)


def start_probe(value: Value, layout: tuple[tuple[int, int], ...], shape: Any) -> torch.Tensor:
    """A tensor of ``shape`` holding each position's index along the channels' dim."""
    where = value.ndim - 1 if value.channels_last else 1
    view = [1] * len(shape)
    view[where] = len(layout)
    return torch.arange(len(layout)).view(view).expand(shape).contiguous()


def reshaped(tracer: Tracer, node: torch.fx.Node, probe: torch.Tensor) -> torch.Tensor | None:
    """The probe through ``node``'s op, its arguments read from recorded shapes; None if they are not known or
    the op does not apply."""
    (args, kwargs), known = resolved(tracer, (node.args[1:], node.kwargs))
    if not known:
        return None
    try:
        if node.op == "call_method":
            return getattr(probe, str(node.target))(*args, **kwargs)
        return node.target(probe, *args, **kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None


register_function_handler((torch.chunk, torch.split), split)
register_method_handler(("chunk", "split"), split)
register_function_handler(torch.tensor_split, split_by_position)
register_method_handler(("tensor_split", "unbind"), split_by_position)
