"""SAM2's Hiera (timm's ``hieradet_sam2``): its position embedding, built from two parameters, its windows put
back, and its attention with pooled queries, cut in whole heads.

The position embedding added to the patch embedding's stream (channels last) is
``permute(interpolate(pos_embed) + pos_embed_window.tile(...))``: each parameter (1, C, h, w) is resampled or
tiled over the grid channel by channel, summed and moved to channels last. Each is a **source** of the stream
(``ChannelSource``, as a ViT's ``pos_embed`` is): the ``activation`` strategy multiplies it by the keep mask along
its channel dim, so a masked channel is 0 after the interpolation, the tiling and the sum, and the cut slices it.
``parameter_sources`` follows any tree of such per-channel ops (``interpolate``, ``tile`` along other dims, ``+``,
``permute``) down to parameters read nowhere else.

``window_unpartition`` puts the windows back by ``-1`` (the width read as what is left), channels last: one op, as
SAM-ViT's (``timm_windows.window_reverse``). ``MultiScaleAttention`` reshapes q, k, v by its head count and ``-1``
(its own head width) and max-pools q per channel at a stage's start: timm's ``Attention`` in whole heads
(``timm_attention``), its head count ``num_heads`` and width of all heads ``dim_out`` set by the cut.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pruneflow.graph.handlers import timm_attention as timm_attention_module
from pruneflow.graph.handlers import tokens
from pruneflow.graph.handlers.timm_attention import timm_attention
from pruneflow.graph.handlers.timm_windows import window_reverse
from pruneflow.graph.nodes import reads_shape
from pruneflow.graph.parameters import attribute
from pruneflow.graph.records import ChannelSource
from pruneflow.graph.registry import register_function_handler, register_method_handler, register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

Sources = tuple[list[tuple[str, nn.Parameter, int]], int]  # (parameter name, parameter, its channel dim), rank


def parameter_sources(tracer: Tracer, node: Any, dim: int) -> Sources | None:
    """The parameters ``node`` is built from by per-channel ops, each with the dim that ends at ``dim`` of ``node``
    (counted from the end), and ``node``'s rank; None where anything else builds it."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":  # read by this op alone (its shape read besides: it sizes the tiling)
        name, shapes = str(node.target), sum(reads_shape(user) for user in node.users)
        parameter = attribute(tracer.model, name)
        alone = tracer.attribute_reads.get(name, 0) - shapes == 1 and isinstance(parameter, nn.Parameter)
        return ([(name, parameter, dim % parameter.ndim)], parameter.ndim) if alone and -parameter.ndim <= dim else None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        if not all(isinstance(d, int) for d in dims) or not -len(dims) <= dim < 0:
            return None
        found = parameter_sources(tracer, node.args[0], dims[dim] % len(dims) - len(dims))
        return found if found is None or found[1] == len(dims) else None
    if node.op == "call_method" and node.target == "tile":
        reps = node.args[1] if len(node.args) == 2 else node.args[1:]
        found = parameter_sources(tracer, node.args[0], dim) if -dim > len(reps) or reps[dim] == 1 else None
        return None if found is None else (found[0], max(found[1], len(reps)))
    if node.op == "call_function" and node.target is F.interpolate:  # resamples the dims after (N, C)
        found = parameter_sources(tracer, node.args[0], dim)
        return found if found is not None and found[1] + dim == 1 else None
    if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
        sides = [parameter_sources(tracer, side, dim) for side in node.args]
        if any(side is None for side in sides):
            return None
        return sides[0][0] + sides[1][0], max(sides[0][1], sides[1][1])
    return None


def add(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x + f(parameters)`` of channels-last tokens, ``f`` per-channel ops (``parameter_sources``): the stream, each
    parameter a source of its channels; anything else as ``tokens.add``."""
    operands = [*node.args, *node.kwargs.values()]
    values = [tracer.values.get(a) if isinstance(a, torch.fx.Node) else None for a in operands]
    if len(operands) == 2 and sum(isinstance(v, Value) for v in values) == 1:
        stream, other = (values[0], operands[1]) if isinstance(values[0], Value) else (values[1], operands[0])
        found = parameter_sources(tracer, other, -1) if stream.channels_last and stream.layout is None else None
        if found is not None and all(parameter.shape[dim] == stream.width for _, parameter, dim in found[0]):
            for name, _, dim in found[0]:
                owner, _, attribute_name = name.rpartition(".")
                module = tracer.model.get_submodule(owner) if owner else tracer.model
                for index, offset in stream.segments:
                    tracer.space(index).sources.append(ChannelSource(name, module, attribute_name, dim, offset))
            return stream
    return tokens.add(tracer, node, value)


def register() -> None:
    from timm.models import hieradet_sam2

    register_function_handler((operator.add, torch.add), add)
    register_method_handler("add", add)
    register_function_handler(hieradet_sam2.window_unpartition, window_reverse, autowrap=True)
    timm_attention_module.HEAD_ATTRIBUTES[hieradet_sam2.MultiScaleAttention] = ("num_heads", "dim_out")
    register_module_handler(hieradet_sam2.MultiScaleAttention, timm_attention)
