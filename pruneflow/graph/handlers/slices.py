"""Parts of a space by constant positions that its owner holds in attributes (``register_split_sizes``): a slice
``x[:, a:b]`` of the channels (DPN's, RexNet's), a split by sizes (``reorderings``), each part cut on its own and
the owner's sizes set by the cut; and a space **embedded** in another: RexNet's stream added to the first channels
of a wider conv's output (``x[:, 0:C] + shortcut``) is those channels. Its producers' rows (and norms' entries) are
cut with them, as points of the wider space, masked at their outputs, and its readers read the wider space's
channels; its own space leaves the graph (as a fold's does). A whole space added to (or multiplied by) copies of
another side by side is embedded once per copy: GhostNet's stem, read by the first block too, added to the block's
``cat([x1, cheap(x1)])``, whose depthwise ``cheap`` carries ``x1``'s channels; its rows j and n + j are cut with
``x1``'s channel j. Several spaces side by side (a concatenation) added to one whole space are each embedded in
it, at their offsets: NASNet's first cell adds ``cat([path_1(x), path_2(x)])`` to its ``conv_1x1`` output."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx

from pruneflow.graph.handlers.gates import chunked
from pruneflow.graph.records import ChannelSpace, SplitSizes
from pruneflow.graph.registry import SPLIT_SIZES
from pruneflow.graph.values import UNKNOWN, Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def held_by(tracer: Tracer, node: torch.fx.Node) -> str | None:
    """The module whose forward runs ``node``, if it holds the sizes of its parts (``register_split_sizes``)."""
    stack = node.meta.get("nn_module_stack") or {}
    name = next(reversed(stack.values()))[0] if stack else ""
    module = tracer.modules.get(name) if stack else tracer.model
    return name if type(module) in SPLIT_SIZES else None


def record(tracer: Tracer, index: int, owner: str, sizes: tuple[int, ...]) -> None:
    space = tracer.space(index)
    if SplitSizes(owner, sizes) not in space.splits:  # ``x[:, :C]`` and ``x[:, C:]``: one split
        space.splits.append(SplitSizes(owner, sizes))


def sizes_set_by_the_cut(tracer: Tracer, node: torch.fx.Node, value: Value, sizes: list[int]) -> bool:
    """Whether a split's sizes are attributes the cut can set: of one space, whole and in order, in several parts,
    by a module holding them. If so, the space records it."""
    owner = held_by(tracer, node)
    if owner is None or not one_whole_space(value) or len(sizes) < 2:
        return False
    record(tracer, value.segments[0][0], owner, tuple(sizes))
    return True


def sliced(tracer: Tracer, node: torch.fx.Node, value: Value, channels: slice) -> Any:
    """``x[:, a:b]`` of the channels, at one position its owner holds (``register_split_sizes``) inside the first
    space ``x`` carries, whole and in order (RexNet's ``x[:, 0:C]`` of a conv's output, DPN's of a concatenation):
    that part of the layout, the space split there; else ``UNKNOWN``."""
    layout = tracer.layout_of(value)
    owner = held_by(tracer, node)
    if layout is None or owner is None or channels.step not in (None, 1) or value.revived_by:
        return UNKNOWN
    start, stop = channels.start or 0, len(layout) if channels.stop is None else channels.stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop):
        return UNKNOWN
    stop = min(stop, len(layout))
    index, width = layout[0][0], tracer.space(layout[0][0]).width
    first = layout[:width] == tuple((index, c) for c in range(width))
    bounds = [position for position in (start, stop) if 0 < position < len(layout)]
    if len(bounds) != 1 or not first or bounds[0] >= width:
        return UNKNOWN
    record(tracer, index, owner, (bounds[0], width - bounds[0]))
    return tracer.with_layout(value, layout[start:stop], by_position=False)


def embedded(tracer: Tracer, values: list[Value], product: bool = False) -> Value | None:
    """A whole space added to a run of another's channels, in order (RexNet's ``x[:, 0:C] + shortcut``), or to
    copies of one space side by side (GhostNet's shortcut conv added to ``cat([x1, cheap(x1)])``, the cheap
    depthwise carrying ``x1``'s channels): recorded, to be embedded at the end (``embed_spaces``); the other
    value (revived as a sum or a ``product`` of the two is). None for anything else."""
    for whole, part in ((values[0], values[1]), (values[1], values[0])):
        placed_by_position = part.by_position or chunked(tracer, part)  # an equal split may yet be by position
        if not one_whole_space(whole) or placed_by_position or whole.channels_last != part.channels_last:
            continue
        inner = whole.segments[0][0]
        placed = run_of(tracer, part, whole.width) or copies_of(tracer, part, whole.width)
        if placed is None or any(tracer.space(index) is tracer.space(inner) for index, _, _ in placed):
            continue
        tracer.embedded += [(inner, index, start, at) for index, start, at in placed]
        revived = (part.revived_by and whole.revived_by) if product else (part.revived_by or whole.revived_by)
        return replace(part, revived_by=revived)
    for whole, part in ((values[0], values[1]), (values[1], values[0])):  # spaces side by side, each into the whole
        pieces = side_by_side(tracer, part, whole) if one_whole_space(whole) else None
        if pieces is not None:
            tracer.embedded += [(index, whole.segments[0][0], start, at) for index, start, at in pieces]
            revived = (part.revived_by and whole.revived_by) if product else (part.revived_by or whole.revived_by)
            return replace(whole, revived_by=revived)
    return None


def side_by_side(tracer: Tracer, part: Value, whole: Value) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """Several whole spaces, each another, side by side in order and as wide as ``whole`` together (NASNet's first
    cell: ``cat([path_1(x), path_2(x)])`` added to its ``conv_1x1`` output): [(each space, where it starts in
    ``whole``, channel of ``whole`` → its channel there)]."""
    if part.layout is not None or part.flattened or part.by_position or len(part.segments) < 2:
        return None
    spaces = [tracer.space(index) for index, _ in part.segments] + [tracer.space(whole.segments[0][0])]
    widths = [space.width for space in spaces[:-1]]
    starts = [sum(widths[:k]) for k in range(len(widths))]
    if [at for _, at in part.segments] != starts or sum(widths) != whole.width or part.width != whole.width:
        return None
    if len({id(space) for space in spaces}) != len(spaces) or whole.channels_last != part.channels_last:
        return None
    return [(index, start, tuple(c - start if start <= c < start + width else -1 for c in range(whole.width)))
            for (index, start), width in zip(part.segments, widths, strict=True)]  # fmt: skip


def run_of(tracer: Tracer, part: Value, width: int | None) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """A run of ``width`` channels of one space, in order: [(that space, where the run starts, channel → run)]."""
    run = part.layout
    if run is None or len(run) != width:
        return None
    index, first = run[0]
    if any(entry != (index, first + i) for i, entry in enumerate(run)):
        return None
    outer = tracer.space(index).width
    return [(index, first, tuple(c - first if first <= c < first + width else -1 for c in range(outer)))]


def copies_of(tracer: Tracer, part: Value, width: int | None) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """Copies of one whole space side by side filling ``width`` channels (a GhostModule's ``[x1, cheap(x1)]``):
    [(that space, 0, channel c → its position in copy k)] for each copy k."""
    if part.layout is not None or part.flattened or len(part.segments) < 2 or part.width != width:
        return None
    index = part.segments[0][0]
    copy = tracer.space(index).width
    if any(tracer.space(i) is not tracer.space(index) or at != k * copy for k, (i, at) in enumerate(part.segments)):
        return None
    if copy * len(part.segments) != width:
        return None
    return [(index, 0, tuple(range(k * copy, (k + 1) * copy))) for k in range(len(part.segments))]


def embed_spaces(tracer: Tracer) -> None:
    """Each recorded space into the channels of the other it was added to, in the order they were met."""
    for inner_index, outer_index, start, at in tracer.embedded:
        inner, outer = tracer.space(inner_index), tracer.space(outer_index)
        if inner is outer:
            continue
        reason = unembeddable(inner, outer, start)
        if reason:
            for space in (inner, outer):
                space.refuse(f"{inner.name} is added to channels {start}… of {outer.name}, and {reason}")
            continue
        outer.points += inner.producers_as_points(tuple(at))
        for consumer in inner.consumers:
            outer.consumers.append(replace(consumer, offset=0, at=moved(at, consumer.at, consumer.offset)))
        for point in inner.points:
            outer.points.append(replace(point, offset=0, at=moved(at, point.at, point.offset)))
        outer.splits += [replace(split, start=split.start + start) for split in inner.splits]
        outer.refusals += [reason for reason in inner.refusals if reason not in outer.refusals]
        outer.coupled = True
        tracer.folded.add(tracer.union_find.root(inner_index))


def unembeddable(space: ChannelSpace, outer: ChannelSpace, start: int) -> str | None:
    """Why ``space``'s readers and writers cannot follow the channels of another it is added to, at ``start``."""
    if space.groups > 1 and not groups_follow(space, outer, start):
        return "it is cut in groups the other's do not keep"
    if space.heads > 1 or space.tied or space.tied_to is not None or space.whole_heads:
        return "it is cut in groups or heads"
    if space.block > 1:
        return "a GroupNorm normalises it in groups"
    if space.scales or space.sources:
        return "it is scaled by a per-channel parameter"
    if any(consumer.kind == "grouped" or consumer.features_per_channel != 1 for consumer in space.consumers):
        return "it is read flattened or by a grouped conv"
    return None


def groups_follow(inner: ChannelSpace, outer: ChannelSpace, start: int) -> bool:
    """Whether ``outer``, cut at the same positions in each of its blocks, cuts ``inner`` (at ``start`` in it) at the
    same positions in each of ``inner``'s groups: outer's blocks divide inner's groups, aligned with them."""
    block = outer.width // outer.groups
    return outer.groups > 1 and (inner.width // inner.groups) % block == 0 and start % block == 0


def moved(at: tuple[int, ...], inner_at: tuple[int, ...], offset: int) -> tuple[int, ...]:
    """A reader's entry of each outer channel: where it reads the inner channel there (``inner_at``, else at
    ``offset``), -1 where it reads none."""
    return tuple(-1 if i < 0 else (inner_at[i] if inner_at else offset + i) for i in at)
