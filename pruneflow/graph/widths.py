"""Widths read from a shape: ``B, N, C = x.shape`` gives ``C``, the width of ``x``'s channel spaces, which a cut
changes. Reshaping ``x`` itself by it (a channel shuffle's ``C // groups``, a ViT's ``x.view(B, -1, C)``), the
tensor follows the cut and the reshape probe follows the tensor. Sizing any other tensor by it (an attention traced
into: ``out.transpose(1, 2).reshape(B, N, C)``, whose heads do not follow ``x``'s width) would break the cut
network, so the spaces whose width it is are refused there, naming the op — after the walk, where the two tensors'
spaces are known to stay apart."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx

from pruneflow.graph.handlers.reorderings import reshaping
from pruneflow.graph.handlers.shapes import SHAPE_ARITHMETIC
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def channel_dim(value: Value) -> int | None:
    """Where ``value``'s channels are, counted from 0; None where its rank is unknown or it is mid-reshape."""
    if value.ndim is None or value.probe is not None or value.flattened or value.layout is not None:
        return None
    return value.ndim - 1 if value.channels_last else 1


def width_of(tracer: Tracer, node: torch.fx.Node) -> set[int]:
    """The spaces whose width ``node`` is (``x.size(c)``, ``x.shape[c]``, arithmetic on them); empty if none."""
    if node in tracer.width_reads:
        return tracer.width_reads[node]
    value, dim = tracer.shape_reads.get(node, (None, None))
    where = None if value is None else channel_dim(value)
    if where is None or not isinstance(dim, int) or dim % value.ndim != where:
        return set()
    return {index for index, _ in value.segments}


def follow(tracer: Tracer, node: torch.fx.Node) -> None:
    """Carry width reads through ``x.shape[i]`` and shape arithmetic; refuse the spaces whose width sizes a tensor
    that is not theirs."""
    arguments: list[torch.fx.Node] = []
    torch.fx.map_arg((node.args, node.kwargs), arguments.append)
    first = node.args[0] if node.args else None
    arithmetic = node.op == "call_function" and node.target in SHAPE_ARITHMETIC
    if arithmetic and first in tracer.shape_reads and tracer.shape_reads[first][1] is None:
        value, _ = tracer.shape_reads[first]
        index = node.args[1] if len(node.args) > 1 else None
        if isinstance(index, int):  # ``x.shape[i]``; arithmetic on ``x.shape[i]`` is a width read, below
            tracer.shape_reads[node] = (value, index)
        return
    marked = set().union(*(width_of(tracer, argument) for argument in arguments))
    if not marked:
        return
    if arithmetic:
        tracer.width_reads[node] = marked
        return
    reshaped = tracer.values.get(first) if reshaping(node) and isinstance(first, torch.fx.Node) else None
    own = [index for index, _ in reshaped.segments] if isinstance(reshaped, Value) else []
    tracer.sized_by_width.append((node, marked, own))


def refuse_foreign_widths(tracer: Tracer) -> None:
    """After the walk: refuse the spaces whose width sized a tensor that is not theirs. A tensor that became theirs
    further on counts as theirs (Swin's attention output, viewed by its input's width before the residual joins
    the two): joined, they are cut alike. The tensor reshaped by another's width is refused too (PVT-v2's
    ``sr(x).reshape(B, C, -1)``, C read from the attention's input): cut on its own, its channels would no longer
    fill that shape."""
    for node, marked, own in tracer.sized_by_width:
        roots = {tracer.union_find.root(index) for index in own}
        if {tracer.union_find.root(index) for index in marked} <= roots:
            continue  # the tensor whose width it is, reshaped by it: it follows the cut
        for index in own:
            tracer.space(index).refuse(f"{tracer.describe(node)} reshapes them by another tensor's width, read from "
                                       "a shape, which their cut would not follow")  # fmt: skip
        reason = (f"{tracer.describe(node)} sizes a tensor by their width, read from a shape, which a cut would not "
                  "follow")  # fmt: skip
        for index in marked:
            tracer.space(index).refuse(reason)
