"""timm's ViT-like attentions that are not timm's ``Attention`` but read their heads as it does, kept whole and
pruned in whole heads (``ChannelSpace.whole_heads``, see ``timm_attention``).

Visformer's ``Attention`` works on a map (B, C, H, W): its ``qkv`` and ``proj`` are 1 × 1 convs, it reshapes q, k, v
by its own ``head_dim`` and its output by ``reshape(B, -1, H, W)``, so its heads are not tied to the stream. A head
whose q, k and v rows are all 0 gives logits of 0, a uniform softmax and the mean of zero value rows, exactly 0, on
the fused path and the unfused one (whose ``scale`` is fixed at construction); the fused path's scale is read from
the head width, which a cut of whole heads keeps. So its q/k/v rows are a space of whole heads, masked at ``qkv``'s
output, and the cut takes a head's rows from ``qkv``, its value columns from ``proj`` and sets ``num_heads``.

NaFlexViT's patch embedding ``NaFlexEmbeds`` is kept whole by timm (its forward branches on its input's rank): its
projection writes the stream, its position tables and prefix tokens are sources of it (``ChannelSource``), as a
ViT's ``pos_embed`` and ``cls_token`` are (``tokens``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import heads_space
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.layers import output_ndim
from pruneflow.graph.nodes import argument
from pruneflow.graph.records import ChannelSource, PrunableLayer
from pruneflow.graph.registry import register_function_handler, register_module_handler
from pruneflow.graph.values import UNKNOWN, Parts, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def conv_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """Visformer's ``Attention``, a leaf: ``qkv`` a consumer of its input map and the producer of a whole-heads
    space read by ``proj`` at its value rows, ``proj`` the producer of its output map."""
    name = str(node.target)
    qkv = PrunableLayer(f"{name}.qkv", module.qkv)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    inner = heads_space(tracer, qkv, value, module.num_heads, proj.name, proj.producer.in_channels)
    heads = tracer.spaces[inner]
    heads.whole_heads, heads.heads_of = True, name
    convs = all(type(layer.producer) is nn.Conv2d and layer.producer.kernel_size == (1, 1) for layer in (qkv, proj))
    if not convs or module.qkv.out_channels != 3 * module.num_heads * module.head_dim:
        heads.refuse(f"attention {name} projects with other layers than 1 × 1 convs of 3 × heads × head_dim rows")
    output = Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=output_ndim(proj.producer))
    if reason := tracer.reused(name):
        heads.refuse(f"attention {name}: {reason}")
        tracer.refuse(output, f"attention {name}: {reason}")
    return output


def naflex_embeds(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """NaFlexViT's ``NaFlexEmbeds``, a leaf (timm keeps it from ``torch.fx``): ``proj`` (a Linear of patches, or a
    conv) writes the stream (B, N, C); its position tables (learned (1, H, W, C) or factorized (1, H, C) and
    (1, W, C), resized per channel) are added to it and its class and register tokens concatenated with it, each a
    source of the stream along its last dim. It returns (tokens, grid size): the grid size carries no channel."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    read(tracer, proj.name, module.proj, value)
    index = tracer.new_space(proj)
    space = tracer.spaces[index]
    for table in ("pos_embed", "pos_embed_y", "pos_embed_x", "cls_token", "reg_token"):
        parameter = getattr(module, table, None)
        if isinstance(parameter, nn.Parameter):
            space.sources.append(ChannelSource(f"{name}.{table}", module, table, parameter.ndim - 1, 0))
    if type(module.proj) not in (nn.Linear, nn.Conv2d) or not isinstance(module.norm, nn.Identity):
        space.refuse(f"patch embedding {name} projects with another layer than a Linear or a conv, or normalises")
    if module.patch_interpolator is not None:  # it reads ``proj.weight`` itself: a mask at proj's output misses it
        space.refuse(f"patch embedding {name} resizes its projection's weights for other patch sizes")
    if reason := tracer.reused(name):
        space.refuse(f"patch embedding {name}: {reason}")
    return Parts((Value(((index, 0),), tracer.width(proj), ndim=3, channels_last=True), None))


def token_pool(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """NaFlexViT's ``global_pool_naflex`` of tokens (B, N, C) to (B, C), a function timm keeps from ``torch.fx``:
    the class token, a mean, a max or both over the (valid) tokens, each channel on its own (a zero one stays 0)."""
    usable = value is not None and value.channels_last and value.ndim == 3 and value.layout is None
    if not usable or argument(node, 2, "pool_type", "token") not in ("token", "avg", "max", "avgmax"):
        return UNKNOWN
    return Value(value.segments, value.width, revived_by=value.revived_by, ndim=2, channels_last=True)


def register() -> None:
    from timm.models.naflexvit import NaFlexEmbeds, global_pool_naflex
    from timm.models.visformer import Attention as VisformerAttention

    register_module_handler(VisformerAttention, conv_attention)
    register_module_handler(NaFlexEmbeds, naflex_embeds)
    register_function_handler(global_pool_naflex, token_pool)
