"""Gates: a product (or a sum) of two parts of one layer's rows, channel for channel. A gated MLP (GLU, SwiGLU or
GeGLU written as ``a, b = fc1(x).chunk(2, -1); act(a) * b``), gMLP's spatial gating unit (``u * proj(norm(v))``,
``proj`` mixing the tokens of each channel on its own) and MambaOut's ``act(g) * cat(i, conv(c))`` multiply part A's
channel i by part B's channel i: rows ``a + i`` and ``b + i`` of the layer meet, and nowhere else. Cutting them in
pairs is exact (a masked pair is 0 on both sides, and 0 times, or plus, 0 is 0), so the layer's space is cut at the
same positions in each block of the parts' width, as a grouped conv's is (``ChannelSpace.groups``).

A split into equal parts (``chunk(n)``) follows such a cut by itself: the cut space of ``groups`` blocks, n dividing
``groups``, splits into parts of whole blocks again, each keeping its channels in order. Such a split is recorded
(``Tracer.chunks``) and the space is read as reordered (its channels placed by position, ``routes``) only where no
such pairing made it so (``settle_chunks``)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def run_in(tracer: Tracer, value: Value) -> tuple[int, int, int] | None:
    """(space, first channel, width) where ``value`` is a run of one space's channels in order; else None."""
    layout = value.layout
    if layout is None or value.flattened or value.probe is not None or not layout:
        return None
    index, first = layout[0]
    if any(tracer.space(i) is not tracer.space(index) or c != first + k for k, (i, c) in enumerate(layout)):
        return None
    return tracer.union_find.root(index), first, len(layout)


def paired(tracer: Tracer, description: str, values: list[Value], product: bool) -> Value | None:
    """Two runs of one space, of one width n, each starting at a multiple of n in a space of a multiple of n
    channels: the space is cut at the same positions in each of its blocks of n (``groups``), and the join carries
    the first run. None for anything else (the caller refuses it)."""
    a, b = values
    runs = [run_in(tracer, value) for value in values]
    if None in runs or a.channels_last != b.channels_last:
        return None
    (index, start, width), (other, other_start, other_width) = runs  # type: ignore[misc]
    space = tracer.space(index)
    if index != other or width != other_width or start == other_start or space.width % width:
        return None
    if start % width or other_start % width:
        return None
    space.groups = tracer.joined_groups(space, space.width // width, description)
    revived = (a.revived_by and b.revived_by) if product else (a.revived_by or b.revived_by)
    # the later run: where a hierarchy of scales (EdgeNeXt's ``conv(sp) + spx[i]``) concatenates the sum back
    later = b if other_start > start else a
    return replace(later, revived_by=revived, ndim=a.ndim or b.ndim)


def chunked(tracer: Tracer, value: Value) -> bool:
    """Whether ``value`` carries a space split into equal parts: read by position unless a gate pairs it, which only
    the end of the walk knows (``settle_chunks``)."""
    spaces = {id(tracer.space(index)) for index, _ in value.segments}
    return any(id(tracer.space(index)) in spaces for index, _ in tracer.chunks)


def settle_chunks(tracer: Tracer) -> None:
    """A space split into n equal parts is reordered by position unless it is cut in whole blocks of its parts (its
    ``groups`` a multiple of n): only then does the split of the cut space give each part its own kept channels."""
    for index, parts in tracer.chunks:
        if tracer.space(index).groups % parts:
            tracer.by_position.add(index)
