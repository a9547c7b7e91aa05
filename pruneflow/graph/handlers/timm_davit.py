"""DaViT's channel attentions (timm's ``davit.ChannelAttention`` and V2) cut inside their heads: the q/k/v rows one
space of heads tied to the stream, a position of a head cut from q, k and v alike, the ``activation`` mask recomputing
the attention without it.

Its forward, on tokens (B, N, C), heads of ``C // num_heads`` channels, ``scale`` fixed at construction::

    q, k, v = qkv(x).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = softmax((scale · k)ᵀ @ v over v's positions)       # a head's positions × positions
    x = proj((attn @ qᵀ)ᵀ.transpose(1, 2).reshape(B, N, C))   # output position i is key position i

A position j whose v rows are 0 still gives its logits 0, and exp(0) enters every kept position's denominator:
zeroing its rows is not the cut network, which has no position j. So the masked network computes the attention
as the cut one does (``ROWS_MASKED_FORWARDS``): its pruned q, k, v rows times 0 (no gradient reaches them), the
logits of a pruned value position −∞ (exactly 0 in the softmax, no share of any denominator), the output of a
pruned key position 0 (its uniform softmax over the kept positions would read the kept queries). Summing over
value position j with query position j and reading output position i from key i, a head loses the same positions
from q, k and v (``ChannelSpace.groups`` 3). Its heads' output is reshaped by its input's width, so the positions
are tied to the stream (``attention.tied_heads``): as many per head as the stream keeps per head; the head count
and ``scale`` stay, and the cut head width is the cut input's width over the heads.

DaViT's ``ChannelAttentionV2`` (its heads ``groups``, q scaled by the token count or its fixed ``head_dim``) takes
``softmax(qᵀ k over k's positions) @ vᵀ``, its output position i read from q's: masked and cut alike, the roles of
q, k and v exchanged. XCiT's and EdgeNeXt's XCA stay cut in whole heads (``timm_channel_attention``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

from pruneflow.graph.handlers.attention import tied_heads
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.handlers.timm_channel_attention import unhandled_variant
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


# Each channel attention's logits as (a, b, c) of its q, k, v: softmax(aᵀ b over b's positions) @ cᵀ, output position
# i read from a's position i; a scaled. V1: (k · scale, v, q); V2: (q scaled by the token count or its head width, k, v)
def _v1_parts(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return k * module.scale, v, q


def _v2_parts(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scale = q.shape[-2] ** -0.5 if module.dynamic_scale else module.head_dim**-0.5
    return q * scale, k, v


# DaViT's channel attentions → (the attribute holding their head count, their logits' parts, the index of a and b)
CHANNEL_ATTENTIONS: dict[type[nn.Module], tuple[str, Any, tuple[int, int]]] = {}


def channel_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """DaViT's ``ChannelAttention`` and ``ChannelAttentionV2``, a leaf: ``qkv`` reads the stream and writes a space of
    heads tied to it, the same positions from q, k and v, masked inside the attention
    (``forward_without_positions``); ``proj`` reads them."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    heads = getattr(module, CHANNEL_ATTENTIONS[type(module)][0])
    if reason := unhandled_variant(node, module, heads):
        return refused(tracer, proj, value, f"channel attention {name} {reason}")
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, unit_name=name, unit=module)
    inner, output = tied_heads(tracer, name, qkv, proj, heads, value)
    space = tracer.space(inner)
    space.groups = tracer.joined_groups(space, 3, f"channel attention {name}'s q, k and v")
    return output


def forward_without_positions(
    module: nn.Module, inputs: tuple[Any, ...], keywords: dict[str, Any], keep: Tensor
) -> Tensor:
    """DaViT's channel attention as its cut computes it: the q, k, v rows times ``keep`` (a 1/0 per row), a pruned
    position's logits −∞ and its output 0."""
    x = inputs[0]
    B, N, C = x.shape
    count, parts, (first, second) = CHANNEL_ATTENTIONS[type(module)]
    heads, rows = getattr(module, count), keep.to(x.dtype).flatten()
    bias = None if module.qkv.bias is None else module.qkv.bias * rows
    qkv = F.linear(x, module.qkv.weight * rows.view(-1, 1), bias)
    a, b, c = parts(module, *qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0))
    kept = rows.view(3, heads, -1, 1)
    logits = a.transpose(-1, -2) @ b
    # the smallest finite logit, not −∞: a head with every position pruned stays finite (its output is 0 anyway)
    attn = logits.masked_fill(kept[second].transpose(-1, -2) == 0, torch.finfo(logits.dtype).min).softmax(dim=-1)
    out = (attn @ c.transpose(-1, -2)) * kept[first]
    return module.proj(out.transpose(-1, -2).transpose(1, 2).reshape(B, N, C))


def register() -> None:
    from timm.models.davit import ChannelAttention, ChannelAttentionV2

    CHANNEL_ATTENTIONS[ChannelAttention] = ("num_heads", _v1_parts, (1, 2))
    CHANNEL_ATTENTIONS[ChannelAttentionV2] = ("groups", _v2_parts, (0, 1))
    for attention in CHANNEL_ATTENTIONS:
        ROWS_MASKED_FORWARDS[attention] = forward_without_positions
    register_module_handler(tuple(CHANNEL_ATTENTIONS), channel_attention)
