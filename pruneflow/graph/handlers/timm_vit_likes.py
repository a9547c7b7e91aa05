"""timm's ViT-like attentions that are not timm's ``Attention`` but read their heads as it does, kept whole and
pruned in whole heads (``ChannelSpace.whole_heads``, see ``timm_attention``).

Visformer's ``Attention`` works on a map (B, C, H, W): its ``qkv`` and ``proj`` are 1 × 1 convs, it reshapes q, k, v
by its own ``head_dim`` and its output by ``reshape(B, -1, H, W)``, so its heads are not tied to the stream. A head
whose q, k and v rows are all 0 gives logits of 0, a uniform softmax and the mean of zero value rows, exactly 0, on
the fused path and the unfused one (whose ``scale`` is fixed at construction); the fused path's scale is read from
the head width, which a cut of whole heads keeps. So its q/k/v rows are a space of whole heads, masked at ``qkv``'s
output, and the cut takes a head's rows from ``qkv``, its value columns from ``proj`` and sets ``num_heads``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import heads_space
from pruneflow.graph.layers import output_ndim
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

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


def register() -> None:
    from timm.models.visformer import Attention as VisformerAttention

    register_module_handler(VisformerAttention, conv_attention)
