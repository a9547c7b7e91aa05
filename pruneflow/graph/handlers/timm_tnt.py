"""TNT (Transformer in Transformer, timm's ``tnt``): its pixel embedding, its attention, and its pixel tokens flattened
per patch. Two streams: the inner one, a patch's pixel tokens (B·N, P, inner width), and the outer one, the patch
tokens (B, N + 1, width) with a class token; each block runs a transformer on each, and its ``proj`` reads a patch's
pixel tokens flattened into the outer width.

``PixelEmbed`` (kept whole: its forward asserts its input's size) is a conv ``proj`` unfolded into each patch's P
pixels (legacy; the other variant unfolds the image first), plus ``pixel_pos`` (1, inner width, h, w) given by the
model: ``proj`` writes the inner stream, ``pixel_pos`` a source of it along dim 1, and the width it reshapes by
(``in_dim``) is set by the cut. The unfold moves a channel's values among positions only, so a zero channel stays 0.

TNT's ``Attention`` writes q and k with ``qk`` (reshaped by its own ``num_heads`` and ``head_dim``), v with ``v``
(by ``num_heads`` and ``-1``) and its heads' output by ``-1``: nothing is reshaped by its input's width, so it is cut
in whole heads, as timm's ``Attention`` is (``timm_attention``): its q/k/v head positions are one space written by
two layers (``qk`` through ``RowBlocks``), masked at the attention (``timm_pyramid_attention``), each head's
positions a block of it (``ChannelSpace.block``, as TinyViT's heads); the cut sets ``num_heads`` and ``hidden_dim``,
the head width stays. A head whose q, k and v rows are 0 has uniform weights over zero values: its output is 0.

``x.reshape(B, N, -1)`` of channels-last tokens read by a layer k times their width (TNT's ``proj``, or its
LayerNorm over a patch's P pixels) lays k copies of the channels side by side: with the channels the input's last
dim, row-major element order puts channel j mod C at position j of any last dim that is a multiple of C. So an inner
channel owns k columns of ``proj`` at the inner width's stride (``Consumer.at``), and k entries of that LayerNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers import tokens
from pruneflow.graph.handlers.attention import attention_output
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.handlers.timm_pyramid_attention import PROJECTIONS, forward_with_rows, projected_rows
from pruneflow.graph.nodes import argument, reads_shape
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import (
    METHOD_HANDLERS,
    ROWS_MASKED_FORWARDS,
    register_method_handler,
    register_module_handler,
)
from pruneflow.graph.values import UNKNOWN, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def pixel_embed(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """TNT's ``PixelEmbed``, a leaf: ``proj`` writes the inner stream, pixel tokens (B·N, P, C), ``pixel_pos`` (its
    second input) a source of it, ``in_dim`` held by the cut."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    if module.legacy:
        read(tracer, proj.name, module.proj, value)
    elif value is not None:  # the image's channels, unfolded with the positions before ``proj`` reads them
        tracer.refuse(value, f"pixel embedding {name} unfolds them into patches before its proj reads them")
    index = tracer.new_space(proj)
    space, width = tracer.space(index), tracer.width(proj)
    space.held_by.append((name, "in_dim"))
    if type(module.proj) is not nn.Conv2d or module.proj.groups != 1:
        space.refuse(f"pixel embedding {name} projects with another layer than a Conv2d")
    position = argument(node, 1, "pixel_pos", None)
    if not tokens.add_source(tracer, Value(((index, 0),), width, ndim=4), position):
        space.refuse(f"pixel embedding {name} adds a position embedding that is not one parameter entry per channel")
    if reason := tracer.reused(name):
        space.refuse(f"pixel embedding {name}: {reason}")
    return Value(((index, 0),), width, ndim=3, channels_last=True)


def unhandled_attention(module: nn.Module) -> str | None:
    """Why TNT's attention cannot be cut in whole heads (None: it can)."""
    if not all(type(getattr(module, part)) is nn.Linear for part in ("qk", "v", "proj")):
        return "projects with other layers than nn.Linear qk, v and proj"
    rows = module.num_heads * module.head_dim
    if module.qk.out_features != 2 * rows or module.v.out_features != rows or module.proj.in_features != rows:
        return "has value heads of another width than its query and key heads"
    return None


def tnt_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """TNT's ``Attention``, a leaf: ``qk`` and ``v`` read the stream and write one space of whole heads, read by
    ``proj``, which writes the output."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    if reason := unhandled_attention(module) or tracer.reused(name):
        return refused(tracer, proj, value, f"attention {name} {reason}")
    heads = tracer.space(projected_rows(tracer, name, module, value))
    # a head's positions lie side by side in q, k and v alike: pruned in whole blocks of them, as TinyViT's heads
    heads.block, heads.heads_of, heads.head_attributes = module.head_dim, name, ("num_heads", "hidden_dim")
    if module.num_heads < 2:  # its rows alone: the stream it reads and its output are cut all the same
        heads.refuse(f"attention {name} has a single head, which a cut in whole heads cannot take")
    heads.consumers.append(Consumer(proj.name, "linear"))
    return attention_output(tracer, proj, value)


def copies_read(tracer: Tracer, node: torch.fx.Node, value: Value) -> int | None:
    """How many times ``value``'s width the one layer reading ``node`` reads (a Linear's ``in_features``, a
    LayerNorm's one normalised size); None where it is read otherwise."""
    users = [user for user in node.users if not reads_shape(user)]
    if len(users) != 1 or users[0].op != "call_module" or value.width is None:
        return None
    reader = tracer.modules[str(users[0].target)]
    if isinstance(reader, nn.Linear):
        width = reader.in_features
    elif isinstance(reader, nn.LayerNorm) and len(reader.normalized_shape) == 1:
        width = reader.normalized_shape[0]
    else:
        return None
    return width // value.width if width % value.width == 0 else None


def tokens_flattened(previous: Any) -> Any:
    """A ``reshape`` rule: ``x.reshape(..., -1)`` of channels-last tokens read by a layer k times their width, k
    copies side by side; anything else to the ``previous`` rule."""

    def reshape(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        usable = value is not None and value.channels_last and not value.flattened and value.probe is None
        layout = tracer.layout_of(value) if usable and len(sizes) >= 2 and sizes[-1] == -1 else None
        copies = copies_read(tracer, node, value) if layout is not None else None
        if copies is None or copies < 2:
            return UNKNOWN if previous is None else previous(tracer, node, value)
        return tracer.with_layout(value, layout * copies, ndim=len(sizes), channels_last=True)

    return reshape


def register() -> None:
    from timm.models.tnt import Attention, PixelEmbed

    PROJECTIONS[Attention] = (("qk", 2), ("v", 1))
    ROWS_MASKED_FORWARDS[Attention] = forward_with_rows
    register_module_handler(Attention, tnt_attention, leaf=lambda module: type(module) is Attention)
    register_module_handler(PixelEmbed, pixel_embed)
    register_method_handler("reshape", tokens_flattened(METHOD_HANDLERS.get("reshape")))
