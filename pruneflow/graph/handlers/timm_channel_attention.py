"""timm's cross-covariance attention (XCA) over a head's channels, of XCiT (``XCA``) and EdgeNeXt
(``CrossCovarianceAttn``), kept whole and cut in whole heads, the stream they read with them; and the Fourier position
encoding XCiT and EdgeNeXt add to the stream XCA reads. DaViT's channel attentions, alike but for the softmax's
operands, are cut inside their heads (``timm_davit``), their softmax masked as the cut computes it.

Each splits its ``qkv`` rows into ``num_heads`` heads of ``C // num_heads`` channels, ``C`` its input's width, and takes
a softmax over a head's channels (a head's channels × channels), ``softmax(q̂ k̂ᵀ · temperature)`` (q and k normalised
over the tokens, a learned ``temperature`` per head). A masked channel inside a head gives a logit of 0, which still
adds exp(0) to every kept channel's denominator: a cut of it would change the head's softmax, so a head's channels go
together or not at all. A whole head whose q, k and v rows are 0 gives logits of 0, a uniform softmax and a zero output
(``attn @ v`` of a zero v), which ``proj`` no longer reads; the other heads never see it. So the mask at ``qkv``'s
output rows is exact, and the cut takes a head's rows from ``qkv``, its columns from ``proj`` and its ``temperature``.

The heads' output is reshaped by the input's width (``reshape(B, N, C)``) and their width is ``C // num_heads``: the
stream the attention reads loses one head's width for each head the attention loses (``attention.whole_heads_tied``, the
stream pruned in multiples of a head's width), and the cut sets ``num_heads``. The scale is fixed (``scale=1.0`` and
``temperature``), and a kept head keeps its width.

Refused in one line, with the stream (the tie): a single head, projections other than one ``nn.Linear`` ``qkv`` of
3 × its input's width and one ``proj``, and any other tensor the attention is called with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import whole_heads_tied
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.records import ChannelScale, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def unhandled_variant(node: torch.fx.Node, module: nn.Module, heads: int) -> str | None:
    """Why the attention's heads cannot be cut whole with its stream (None: they can)."""
    if any(isinstance(a, torch.fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return "is called with another tensor besides its input"
    if type(module.qkv) is not nn.Linear or type(module.proj) is not nn.Linear:
        return "projects with other layers than one nn.Linear qkv and one proj"
    width = module.qkv.in_features
    if module.qkv.out_features != 3 * width or module.proj.in_features != width or width % heads:
        return f"has q, k, v rows that are not 3 × its input's width in {heads} heads"
    return None


def channel_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """XCiT's ``XCA``, EdgeNeXt's ``CrossCovarianceAttn``, a leaf: ``qkv`` reads the
    stream and writes a space of whole heads tied to it, read by ``proj`` at its value rows; a per-head
    ``temperature`` is cut with its heads."""
    name = str(node.target)
    qkv = PrunableLayer(f"{name}.qkv", module.qkv)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    heads = module.num_heads
    if reason := unhandled_variant(node, module, heads):
        return refused(tracer, proj, value, f"channel attention {name} {reason}")
    inner, output = whole_heads_tied(tracer, name, qkv, proj, heads, value)
    if isinstance(getattr(module, "temperature", None), nn.Parameter):  # (heads, 1, 1): entry h for head h's rows
        rows = module.qkv.out_features // (3 * heads)
        at = tuple(head for _ in range(3) for head in range(heads) for _ in range(rows))
        tracer.spaces[inner].scales.append(ChannelScale(f"{name}.temperature", 0, 0, at=at))
    return output


def fourier_positions(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """XCiT's and EdgeNeXt's ``PositionalEncodingFourier``, a leaf (timm keeps it from ``torch.fx``): sines and
    cosines of the positions projected by its 1 × 1 conv ``token_projection``, a map (B, dim, H, W) of a space of
    its own, which joins the stream it is added to; it reads no channel."""
    name = str(node.target)
    layer = PrunableLayer(f"{name}.token_projection", module.token_projection)
    output = Value(((tracer.new_space(layer), 0),), tracer.width(layer), ndim=4)
    if reason := tracer.reused(name):
        tracer.refuse(output, f"position encoding {name}: {reason}")
    return output


def register() -> None:
    from timm.models import edgenext, xcit

    attentions = (xcit.XCA, edgenext.CrossCovarianceAttn)
    register_module_handler(attentions, channel_attention)
    register_module_handler((xcit.PositionalEncodingFourier, edgenext.PositionalEncodingFourier), fourier_positions)
