"""NextViT's ``EfficientAttention`` (E-MHSA, timm), kept whole: separate ``q``, ``k``, ``v`` layers whose heads are
tied to the stream they read, its spatial reduction's BatchNorm a point of that stream.

Its forward, on tokens ``x`` (B, N, C)::

    q = q(x).reshape(B, N, num_heads, head_dim)            # head_dim held by the module, set by the cut
    x = norm(sr(x.transpose(1, 2))).transpose(1, 2)         # sr_ratio > 1: mean over groups of tokens, a BatchNorm1d
    k, v = k(x), v(x)                                       # reshaped by num_heads and head_dim too
    out = proj(attention(q, k, v).transpose(1, 2).reshape(B, N, C))   # C: its input's width

The heads' output is reshaped by the input's width, so the q/k/v rows are tied to the stream as CaiT's class attention
is (``ChannelSpace.parts`` 1: a position of a head is cut from q, k and v alike; ``timm_attention_classes``): each
head keeps as many positions as the stream keeps per head, the head count stays, the cut sets ``head_dim`` and turns
the fused path off (its scale would follow the cut head width). The pooling averages each channel over tokens; the
BatchNorm1d after it writes β into a pruned channel, so it is a point of the stream, masked at its output before
``k`` and ``v`` read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import attention_output, tie
from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def efficient_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``EfficientAttention``, a leaf: ``q``, ``k``, ``v`` read the stream (``k`` and ``v`` after the reduction's
    norm, a point of it) and write one space of heads tied to it, read by ``proj``, which writes the output."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    layers = [PrunableLayer(f"{name}.{part}", getattr(module, part)) for part in ("q", "k", "v")]
    reason = unhandled_variant(module)
    for layer in layers:
        read(tracer, layer.name, layer.producer, value)
    if module.norm is not None and value is not None and reason is None:
        tokens_first = Value(value.segments, value.width, ndim=3, layout=value.layout)  # (B, C, N) after transpose
        add_points(tracer, f"{name}.norm", module.norm, tokens_first, (1, module.norm.num_features, 1))
    inner = tracer.new_space(layers[0])
    for layer in layers[1:]:
        inner = tracer.union(inner, tracer.new_space(layer), f"efficient attention {name}'s q, k and v")
    heads = tracer.space(inner)
    heads.heads, heads.parts, heads.unfused_by_cut, heads.head_width_of = module.num_heads, 1, name, name
    heads.consumers.append(Consumer(proj.name, "linear"))
    tie(tracer, name, inner, value, module.q.in_features)
    output = attention_output(tracer, proj, value)
    if reason is not None:
        for tensor in (value, output):
            tracer.refuse(tensor, f"efficient attention {name} {reason}")
        heads.refuse(f"efficient attention {name} {reason}")
    return output


def unhandled_variant(module: nn.Module) -> str | None:
    """Why its heads cannot follow the stream (None: they can)."""
    if not all(type(getattr(module, part)) is nn.Linear for part in ("q", "k", "v", "proj")):
        return "projects with other layers than nn.Linear"
    if module.q.out_features != module.q.in_features or module.num_heads * module.head_dim != module.q.out_features:
        return "has heads whose width is not its input's"
    if module.norm is not None and type(module.norm) is not nn.BatchNorm1d:
        return f"normalises its reduced tokens with {type(module.norm).__name__}, not a BatchNorm1d"
    return None


def register() -> None:
    from timm.models.nextvit import EfficientAttention

    register_module_handler(EfficientAttention, efficient_attention)
