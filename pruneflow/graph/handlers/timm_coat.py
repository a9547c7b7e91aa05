"""CoaT's factorised attention with its convolutional relative position encoding (timm's
``FactorAttnConvRelPosEnc`` calling a ``ConvRelPosEnc``), kept whole: its q/k/v rows one space of heads tied to the
stream, cut at the same positions in q, k and v, and the encoding's depthwise convs cut with the value positions.

Its forward, on tokens ``x`` (B, N, C), heads of ``C // num_heads`` channels::

    q, k, v = qkv(x).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = scale · q @ (softmax(k over the tokens)ᵀ @ v) + q_img · crpe(v_img)   # crpe: depthwise convs per heads
    x = proj(out.transpose(1, 2).reshape(B, N, C))                               # C: its input's width

Output position j of a head reads value position j (in both terms) and query position j (the encoding's product
``q_j · conv(v)_j``, where ``conv`` adds its bias to a masked value), and query position i meets key position i
(``q_i · softmax(k_i)``, which a masked key makes uniform, not 0). So q, k and v lose the same positions of a head
(``ChannelSpace.groups`` 3 on the q/k/v space): a head position masked in all three is 0 at the output, whatever the
encoding's bias and the softmax of its key made of it. The heads' output is reshaped by the input's width, so the
positions are tied to the stream (``attention.tied_heads``): as many per head as the stream keeps per head, the
head count stays, and ``scale``, fixed at construction, applies to the cut heads as to the masked ones.

The encoding splits the value rows by heads (``torch.split(v, channel_splits)``, a run of whole heads per window
size), one depthwise conv per run: each conv's rows are a point of the value rows of its heads, and the cut sets
``channel_splits`` to the positions each run keeps (``reorderings.sizes_held_in``). CoaT shares one encoding among
the attentions of a stage (its serial blocks and its parallel blocks' attentions of that scale), so their q/k/v
spaces are one: the shared convs keep the same value positions for all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import tied_heads
from pruneflow.graph.handlers.reorderings import sizes_held_in
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.records import ChannelPoint, PrunableLayer, SplitSizes
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def factorised_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``FactorAttnConvRelPosEnc``, a leaf: ``qkv`` reads the stream and writes a space of heads tied to it, the
    same positions from q, k and v, the encoding's convs points of its value rows; ``proj`` reads them."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    reason = unhandled_variant(module)
    if reason:
        return refused(tracer, proj, value, f"factorised attention {name} {reason}")
    qkv = PrunableLayer(f"{name}.qkv", module.qkv)
    inner, output = tied_heads(tracer, name, qkv, proj, module.num_heads, value)
    heads = tracer.space(inner)
    heads.groups = tracer.joined_groups(heads, 3, f"factorised attention {name}'s q, k and v")
    encoding = next(n for n, m in tracer.modules.items() if m is module.crpe)
    shared = next((i for i, space in enumerate(tracer.spaces) if any(s.owner == encoding for s in space.splits)), None)
    if shared is not None:  # an attention before this one reads the same encoding: the same value positions
        tracer.union(shared, inner, f"the attentions sharing {encoding}")
        return output
    width = module.qkv.in_features
    start = 2 * width  # the value rows
    for i, (conv, size) in enumerate(zip(module.crpe.conv_list, module.crpe.channel_splits, strict=True)):
        at = tuple(c - start if start <= c < start + size else -1 for c in range(3 * width))
        heads.points.append(ChannelPoint(f"{encoding}.conv_list.{i}", conv, 0, (1, size, 1, 1), at=at))
        start += size
    heads.splits.append(SplitSizes(encoding, tuple(module.crpe.channel_splits), start=2 * width))
    return output


def unhandled_variant(module: nn.Module) -> str | None:
    """Why its heads cannot be cut with the stream (None: they can)."""
    if not all(type(layer) is nn.Linear for layer in (module.qkv, module.proj)):
        return "projects with other layers than nn.Linear"
    width = module.qkv.in_features
    if module.qkv.out_features != 3 * width or width % module.num_heads:
        return "has heads whose width is not its input's"
    convs, splits = module.crpe.conv_list, module.crpe.channel_splits
    depthwise = all(type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels for conv in convs)
    if not depthwise or [conv.out_channels for conv in convs] != list(splits) or sum(splits) != width:
        return "encodes relative positions with convs that are not depthwise over its value rows"
    return None


def register() -> None:
    from timm.models.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc

    register_module_handler(FactorAttnConvRelPosEnc, factorised_attention)
    register_split_sizes(ConvRelPosEnc, sizes_held_in("channel_splits"))
