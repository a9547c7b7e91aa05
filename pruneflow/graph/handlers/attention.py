"""Attention layers kept whole: torchvision's Swin ``ShiftedWindowAttention`` and MaxViT's
``PartitionAttentionLayer`` (exactly as torchvision builds them), and Swin's patch merging. Their q, k, v rows are
a space of **heads** tied to the stream they read: the head width follows the stream's width, so both are pruned
together or not at all (``ChannelSpace.tied_to``)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn
from torchvision.models.maxvit import PartitionAttentionLayer
from torchvision.models.swin_transformer import ShiftedWindowAttention, _patch_merging_pad

from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.layers import is_partition_attention, is_window_attention
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import register_function_handler, register_module_handler
from pruneflow.graph.values import UNKNOWN, Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def value_rows(width: int) -> tuple[int, ...]:
    """Where a q/k/v space's channels reach the layer reading its value rows: the last third, in order."""
    return (-1,) * (2 * width) + tuple(range(width))


def heads_and_output(
    tracer: Tracer, qkv: PrunableLayer, proj: PrunableLayer, heads: int, value: Value | None
) -> tuple[int, Value]:
    """An attention kept whole: ``qkv`` reads ``value`` (a consumer) and writes the q, k and v rows of every head (a
    space of ``heads``, its index returned), ``proj`` reads the value rows and writes the output (a new space)."""
    read(tracer, qkv.name, qkv.producer, value)
    inner = tracer.new_space(qkv)
    tracer.spaces[inner].heads = heads
    tracer.spaces[inner].consumers.append(Consumer(proj.name, "linear", at=value_rows(proj.producer.in_features)))
    return inner, attention_output(tracer, proj, value)


def attention_output(tracer: Tracer, proj: PrunableLayer, value: Value | None) -> Value:
    """An attention's output: a new space written by ``proj``, channels last, of the rank of its input ``value``."""
    return Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=value.ndim if value else None,
                 channels_last=True)  # fmt: skip


def tied_heads(
    tracer: Tracer, name: str, qkv: PrunableLayer, proj: PrunableLayer, heads: int, value: Value | None
) -> tuple[int, Value]:
    """``heads_and_output`` for an attention whose head width follows the stream it reads: its q/k/v space tied to
    ``value``'s (pruned with it or not at all)."""
    inner, output = heads_and_output(tracer, qkv, proj, heads, value)
    tie(tracer, name, inner, value, qkv.producer.in_features)
    return inner, output


def tie(tracer: Tracer, name: str, inner: int, value: Value | None, width: int) -> None:
    """Tie attention ``name``'s q/k/v space ``inner`` to the stream it reads (``value``, ``width`` channels wide)."""
    if tracer.reused(name) or not one_whole_space(value) or value.width != width:
        tracer.space(inner).refuse(f"attention {name}'s head width follows a tensor that is not one whole space")
    else:
        tracer.ties.append((inner, value.segments[0][0], name))


def window_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """torchvision's Swin attention, a leaf (``tied_heads``: the head width is the input's width / heads). Its
    ``qkv`` and ``proj`` are masked at the attention's output, the only place their channels exist outside it."""
    if not is_window_attention(module):  # V2's cosine attention, a subclass, is another function
        return UNKNOWN
    name = str(node.target)
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, unit_name=name, unit=module)
    proj = PrunableLayer(f"{name}.proj", module.proj, unit_name=name, unit=module)
    return tied_heads(tracer, name, qkv, proj, module.num_heads, value)[1]


def partition_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """torchvision's MaxViT window or grid attention layer, a leaf: it partitions its input (N, C, H, W) into
    windows, channels last, and adds an attention and an MLP to it, each after a LayerNorm over the channels,
    then puts the windows back. The stream it reads is written again by the attention's ``merge`` and the MLP's
    second layer (coupled, as residuals are), read by ``to_qkv`` and the MLP's first layer, normalised by both
    LayerNorms (channel points); ``to_qkv`` writes the q, k, v rows of every head, a space tied to the stream
    (``attention``), whose ``merge`` reads the value rows; the MLP's hidden width is a space of its own."""
    if not is_partition_attention(module):
        return UNKNOWN
    name = str(node.target)
    width = module.attn_layer[0].normalized_shape[0]
    usable = one_whole_space(value) and value.width == width and not value.flattened and value.channels_at(1)
    if not usable or value.revived_by is not None or tracer.reused(name):
        tracer.refuse_unknown(node, [value])
        return None
    (stream, _), windows = value.segments[0], replace(value, channels_last=True, ndim=4)
    attention, mlp = module.attn_layer[1], module.mlp_layer
    for norm_name in (f"{name}.attn_layer.0", f"{name}.mlp_layer.0"):
        add_points(tracer, norm_name, tracer.modules[norm_name], windows, (width,))
    qkv = PrunableLayer(f"{name}.attn_layer.1.to_qkv", attention.to_qkv)
    read(tracer, qkv.name, attention.to_qkv, windows)
    inner = tracer.new_space(qkv)
    tracer.spaces[inner].heads = attention.n_heads
    tracer.spaces[inner].head_width_of = f"{name}.attn_layer.1"
    merge = f"{name}.attn_layer.1.merge"
    tracer.spaces[inner].consumers.append(Consumer(merge, "linear", at=value_rows(width)))
    tracer.ties.append((inner, stream, name))
    first = PrunableLayer(f"{name}.mlp_layer.1", mlp[1])
    read(tracer, first.name, mlp[1], windows)
    hidden = tracer.new_space(first)
    tracer.spaces[hidden].consumers.append(Consumer(f"{name}.mlp_layer.3", "linear"))
    for layer in (PrunableLayer(merge, attention.merge), PrunableLayer(f"{name}.mlp_layer.3", mlp[3])):
        stream = tracer.union(stream, tracer.new_space(layer), f"{name}'s residual")
    return Value(((stream, 0),), width, ndim=value.ndim)


def patch_merging_pad(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """Swin's patch merging: the 4 pixels of each 2×2 patch side by side, channels last."""
    if value is None or value.flattened or not value.channels_last or tracer.layout_of(value) is None:
        return UNKNOWN
    return tracer.with_layout(value, tracer.layout_of(value) * 4)


register_module_handler(ShiftedWindowAttention, window_attention, leaf=is_window_attention)
register_module_handler(PartitionAttentionLayer, partition_attention, leaf=is_partition_attention)
register_function_handler(_patch_merging_pad, patch_merging_pad)
