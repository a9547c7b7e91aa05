"""timm's LeViT (token mode): its ``LinearNorm`` and its two attentions, cut in whole heads.

``LinearNorm`` is a Linear followed by a BatchNorm1d over its tokens flattened into the batch
(``bn(x.flatten(0, 1)).reshape_as(x)``): the BatchNorm normalises each output feature on its own, so it is the
Linear's norm and its channel point (β flows into a zeroed feature), exactly as a BatchNorm after a conv; a leaf.

``Attention`` writes each head's q, k and v rows side by side (``view(B, N, heads, -1).split([key_dim, key_dim,
val_dim])``) and adds a learned bias per head to its logits (``attention_biases``, a row per head; the index buffer
``attention_bias_idxs`` is per position and stays): per position a cut is impossible (the logits' scale is
``key_dim ** -0.5``, the bias per head), but whole heads go exactly, as TinyViT's (``side_by_side_heads``): their rows,
their bias rows and ``proj``'s columns for their values; the cut sets ``num_heads`` and ``val_attn_dim``, which the
forward reshapes by. ``proj`` is an activation then a ``LinearNorm``; the activation must keep a pruned head's 0 at 0
(Hardswish does), or the rows are refused. ``AttentionDownsample``'s ``kv`` writes a head's k and v side by side, cut
the same way; its separate ``q`` subsamples the tokens (``Downsample``: a ``view`` and a strided slice, every channel
kept) before its ``LinearNorm``, whose rows of a pruned head go with it (points of the ``kv`` space). The stream each
attention reads (``qkv``, ``kv``, ``q``: consumers) and the space ``proj`` writes (a producer with its BatchNorm1d)
stay prunable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import attention_output
from pruneflow.graph.handlers.pointwise import keeps_zero
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.timm_mobile_blocks import side_by_side_heads
from pruneflow.graph.records import ChannelPoint, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def linear_norm_layer(name: str, module: nn.Module) -> PrunableLayer:
    """A ``LinearNorm``'s Linear as a producer, its BatchNorm1d its norm."""
    return PrunableLayer(f"{name}.linear", module.linear, f"{name}.bn", module.bn)


def linear_norm(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """A ``LinearNorm``, a leaf: a consumer of ``value`` and the producer of a space of its own, normalised."""
    name = str(node.target)
    layer = linear_norm_layer(name, module)
    read(tracer, layer.name, layer.producer, value)
    index = tracer.new_space(layer)
    if tracer.reused(name):
        tracer.spaces[index].refuse(tracer.reused(name))
    return Value(((index, 0),), tracer.width(layer), ndim=value.ndim if value else None, channels_last=True)


def attention_spaces(tracer: Tracer, name: str, module: nn.Module, rows: str, value: Value | None) -> tuple[int, Value]:
    """An attention's ``LinearNorm`` ``rows`` (``qkv``, ``kv``) reading ``value`` and writing a space of its heads'
    rows, and its ``proj.ln`` reading its heads' values and writing its output (a new space, prunable): (the rows'
    space, the output)."""
    proj = linear_norm_layer(f"{name}.proj.ln", module.proj.ln)
    layer = linear_norm_layer(f"{name}.{rows}", getattr(module, rows))
    read(tracer, layer.name, layer.producer, value)
    index = tracer.new_space(layer)
    output = attention_output(tracer, proj, value)
    if tracer.reused(name):
        tracer.refuse(value, f"attention {name}: {tracer.reused(name)}")
        tracer.refuse(output, f"attention {name}: {tracer.reused(name)}")
    return index, output


def refusing_activation(module: nn.Module) -> str | None:
    """Why ``proj``'s activation breaks a pruned head's 0 (None: it keeps it, Hardswish)."""
    act = module.proj.act
    return None if keeps_zero(act) else f"its activation {type(act).__name__} turns a pruned head's 0 into another one"


def levit_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``Attention``: its ``qkv`` rows, each head's q, k and v side by side, pruned in whole heads
    (``side_by_side_heads``); ``proj``'s activation keeps a pruned head's 0 at 0, or the rows are refused."""
    name = str(node.target)
    rows, output = attention_spaces(tracer, name, module, "qkv", value)
    side_by_side_heads(tracer, name, module, rows, f"{name}.proj.ln.linear", "LeViT", "val_attn_dim")
    if why := tracer.reused(name) or refusing_activation(module):
        tracer.space(rows).refuse(f"LeViT attention {name}: {why}")
    return output


def levit_attention_downsample(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``AttentionDownsample``: its ``kv`` rows, each head's k and v side by side, pruned in whole heads; its
    separate ``q.ln`` (reading the subsampled tokens, every channel kept) loses the query rows of those heads: its
    Linear and BatchNorm1d are points of the ``kv`` space at the k positions (query row ``h · key_dim + i`` with
    head h's key row i), so a pruned head's q, k and v are all 0."""
    name = str(node.target)
    rows, output = attention_spaces(tracer, name, module, "kv", value)
    side_by_side_heads(tracer, name, module, rows, f"{name}.proj.ln.linear", "LeViT", "val_attn_dim", keys=1)
    query = linear_norm_layer(f"{name}.q.ln", module.q.ln)
    read(tracer, query.name, query.producer, value)
    space, keys = tracer.space(rows), module.key_dim
    at = tuple(c // space.block * keys + c % space.block if c % space.block < keys else -1 for c in range(space.width))
    width = module.q.ln.linear.out_features
    for layer_name, layer in ((query.name, query.producer), (query.norm_name, query.norm)):
        space.points.append(ChannelPoint(layer_name, layer, 0, (width,), at=at))
    uneven = width != module.num_heads * keys and "its q rows are not heads × key_dim"
    if why := tracer.reused(name) or refusing_activation(module) or uneven:
        space.refuse(f"LeViT attention {name}: {why}")
    return output


def register() -> None:
    from timm.models import levit

    register_module_handler(levit.LinearNorm, linear_norm)
    # the token mode only: the conv mode's attentions (``use_conv``) read (N, C, H, W) and are left to the walk
    register_module_handler(levit.Attention, levit_attention, leaf=lambda module: not module.use_conv)
    register_module_handler(
        levit.AttentionDownsample, levit_attention_downsample, leaf=lambda module: not module.use_conv
    )
