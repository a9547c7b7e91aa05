"""timm's multi-head self-attention (``timm.layers.attention.Attention``: ViT, DeiT and the models built from it),
kept whole: its ``qkv`` reads the token stream (a consumer) and writes the q, k and v rows of every head, a space of
**whole heads** (``ChannelSpace.whole_heads``); its ``proj`` reads the value rows and writes its output, a space of
its own.

Unlike torchvision's Swin attention, timm's reshapes q, k, v by a head width of its own (``head_dim``), not by its
input's width, so its heads are not tied to the stream: the stream and the heads are pruned apart. Positions inside
a head are not pruned: the fused path (``scaled_dot_product_attention``) scales the logits by 1/√(head width) from
the tensors' shape, so a cut head width would change the softmax the masked network computed. A whole head is
another matter: with its q, k and v rows all zero (after the bias), its logits are all 0, its softmax uniform, and
its output the mean of zero value rows, exactly 0, in the fused and the unfused path alike; the rows of the other
heads are untouched. So a mask of ``qkv``'s output rows (a channel point at ``qkv``) is exact, and the cut takes the
head's rows from ``qkv``, its value columns from ``proj``, and sets the attention's ``num_heads`` and ``attn_dim``.
A q/k norm (``qk_norm``) is per head width and needs nothing, and so is a rotary position embedding
(``AttentionRope``: Qwen3-ViT, NaFlexViT with rope), which rotates pairs of positions inside a head: a head's zero
value rows give it a zero output whatever its q and k became; the variants whose extra parts read the heads' width
(a gate, a norm over ``attn_dim``) are refused, and so is the latent attention pool (``global_pool="map"``),
which reshapes by its input's width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import heads_and_output
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

# Attentions whose head count and width of all heads are held in other attributes than ``num_heads`` and ``attn_dim``
# (Hiera's ``heads``, ``dim_out``): type → those attributes, which the cut sets
HEAD_ATTRIBUTES: dict[type[nn.Module], tuple[str, str]] = {}


def unreadable_parts(module: nn.Module) -> str | None:
    """Why a timm attention's q/k/v rows cannot be cut (None: they can): its parts that read all its heads' width,
    and projections other than one ``qkv`` and one ``proj`` Linear layer. Shared by ``timm_attention_classes``."""
    if getattr(module, "gate", None) is not None:
        return "gates its heads' output with a sigmoid of its input (gated=True)"
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        return "normalises over all its heads' width (scale_norm=True)"
    if type(getattr(module, "qkv", None)) is not nn.Linear or type(module.proj) is not nn.Linear:
        return "projects with other layers than one nn.Linear qkv and one proj"
    return None


def unhandled_variant(module: nn.Module) -> str | None:
    """Why the attention's heads cannot be cut (None: they can): the parts that read the heads' width."""
    if reason := unreadable_parts(module):
        return reason
    count = HEAD_ATTRIBUTES.get(type(module), ("num_heads",))[0]
    if getattr(module, count) < 2:  # its only head: pruned, nothing would be left (Hiera's first stage)
        return "has a single head, which a cut in whole heads cannot take"
    # SAM2-Hiera's holds no ``head_dim``: it reshapes by ``-1``, the rows' share of each head
    head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * getattr(module, count)))
    if module.qkv.out_features != 3 * getattr(module, count) * head_dim:
        return "has q, k, v rows that are not 3 × heads × head_dim"
    if getattr(module, "num_kv_groups", 1) != 1:
        return "shares its keys and values among groups of heads"
    return None


def timm_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """timm's ``Attention``, a leaf: ``qkv`` a consumer of its input and the producer of a whole-heads space read by
    ``proj`` at its value rows, ``proj`` the producer of the output."""
    return named_attention(tracer, str(node.target), module, value)


def named_attention(tracer: Tracer, name: str, module: nn.Module, value: Value | None) -> Value:
    """``timm_attention`` for the attention at ``name``, also where a block kept whole calls it (MobileViT's)."""
    qkv = PrunableLayer(f"{name}.qkv", module.qkv)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    attributes = HEAD_ATTRIBUTES.get(type(module), ("num_heads", "attn_dim"))
    inner, output = heads_and_output(tracer, qkv, proj, getattr(module, attributes[0]), value)
    heads = tracer.spaces[inner]
    heads.whole_heads, heads.heads_of, heads.head_attributes = True, name, attributes
    reason = unhandled_variant(module) or tracer.reused(name)
    if reason:
        heads.refuse(f"attention {name} {reason}")
    if tracer.reused(name):
        tracer.refuse(output, f"attention {name}: {tracer.reused(name)}")
    return output


def latent_pool(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> None:
    """timm's ``AttentionPoolLatent`` (a ViT's ``global_pool="map"``), a leaf: it reshapes its attention's output by
    its input's width read from ``x.shape``, a width no cut of that input may change; refused, in one line."""
    tracer.refuse(value, f"attention pool {node.target} reshapes its heads by its input's width")


def register() -> None:
    from timm.layers.attention import Attention, AttentionRope
    from timm.layers.attention_pool import AttentionPoolLatent

    exact = (Attention, AttentionRope)  # a subclass may have another forward: traced into
    register_module_handler(exact, timm_attention, leaf=lambda module: type(module) in exact)
    register_module_handler(AttentionPoolLatent, latent_pool)
