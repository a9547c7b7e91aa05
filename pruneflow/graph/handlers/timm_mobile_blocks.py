"""timm's mobile hybrid blocks that timm keeps from ``torch.fx`` (their forwards branch on their input's size),
read whole by the graph as the walk would read their insides: MobileViT's ``MobileVitBlock``, TinyViT's
``TinyVitBlock``.

``MobileVitBlock``: a local conv (``conv_kxk``, conv-BN-act) reads its input; a 1 × 1 conv (``conv_1x1``) writes the
transformer's width; the map is unfolded into patches of tokens (reshapes by the width ``C`` read from the map's own
shape, so they follow any cut of it, and a bilinear resize, per channel), run through timm's ViT blocks, normalised,
folded back, and ``conv_proj`` (conv-BN-act) writes the block's width; ``conv_fusion`` reads the block's input
concatenated with it. So the transformer's width is one space, as a ViT's stream is (``conv_1x1``, every ``attn.proj``
and ``mlp.fc2`` its producers, the LayerNorms its points, ``conv_proj`` its reader); each attention is timm's,
cut in whole heads (``timm_attention``); each MLP's hidden width a space of its own. A zero channel stays 0 through
the unfold, the fold and the resize, each of which moves a channel's values among positions only.

``TinyVitBlock`` (channels last, (B, H, W, C)): its attention on windows (padded with zero tokens, partitioned and
reversed by reshapes by the ``C`` of its input's shape) adds to the stream, a depthwise ``local_conv`` (conv-BN)
carries channel c to channel c, and a ``NormMlp`` adds to it again: one stream, ``attn.proj``, ``local_conv`` and
``mlp.fc2`` its producers, ``attn.norm`` and ``mlp.norm`` its points, ``attn.qkv`` and ``mlp.fc1`` its readers, the
MLP's hidden width a space of its own. Its attention's q/k/v rows lie side by side per head
(``view(B, N, heads, -1).split([key_dim, key_dim, val_dim])``), a bias per head added to its logits: pruned in whole
heads (``ChannelSpace.block``), the bias table's rows with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.handlers.timm_attention import named_attention
from pruneflow.graph.handlers.timm_mobile_attention import conv_layer
from pruneflow.graph.records import ChannelScale, Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def tokens(index: int, width: int) -> Value:
    """A space as tokens (B, N, C), its channels last."""
    return Value(((index, 0),), width, ndim=3, channels_last=True)


def unreadable_block(block: nn.Module) -> str | None:
    """Why a ViT block's stream, heads or hidden width cannot be read as ``vit_block`` reads them (None: they can)."""
    mlp = getattr(block, "mlp", None)
    if not all(isinstance(getattr(block, part, None), nn.Identity) for part in ("ls1", "ls2")):
        return "scales its residuals (a layer scale)"
    if mlp is None or not all(type(getattr(mlp, layer, None)) is nn.Linear for layer in ("fc1", "fc2")):
        return "has another MLP than two nn.Linear layers"
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        return "normalises its MLP's hidden width"
    return None


def vit_block(tracer: Tracer, name: str, block: nn.Module, stream: int, width: int) -> int:
    """timm's ViT ``Block`` at ``name``, read as the walk reads a traced one: its LayerNorms points of the stream,
    its attention (``named_attention``) and its MLP's ``fc2`` writing it again (residuals: one space), ``fc1`` a
    space of its own; the stream's id."""
    add_points(tracer, f"{name}.norm1", block.norm1, tokens(stream, width), (width,))
    output = named_attention(tracer, f"{name}.attn", block.attn, tokens(stream, width))
    stream = tracer.union(stream, output.segments[0][0], f"{name}'s attention residual")
    add_points(tracer, f"{name}.norm2", block.norm2, tokens(stream, width), (width,))
    fc1, fc2 = (PrunableLayer(f"{name}.mlp.{layer}", getattr(block.mlp, layer)) for layer in ("fc1", "fc2"))
    read(tracer, fc1.name, fc1.producer, tokens(stream, width))
    hidden = tracer.new_space(fc1)
    tracer.space(hidden).consumers.append(Consumer(fc2.name, "linear"))
    return tracer.union(stream, tracer.new_space(fc2), f"{name}'s MLP residual")


def mobilevit_block(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """MobileViT's ``MobileVitBlock``, a leaf: its local conv and ``conv_fusion`` read its input, its transformer's
    width one space from ``conv_1x1`` to ``conv_proj``, its output written by ``conv_fusion`` (or ``conv_proj``)."""
    name = str(node.target)
    local = conv_layer(f"{name}.conv_kxk", module.conv_kxk)
    read(tracer, local.name, local.producer, value)
    expand = PrunableLayer(f"{name}.conv_1x1", module.conv_1x1)
    read(tracer, expand.name, expand.producer, Value(((tracer.new_space(local), 0),), tracer.width(local), ndim=4))
    stream, width = tracer.new_space(expand), tracer.width(expand)
    why = tracer.reused(name) or next(filter(None, map(unreadable_block, module.transformer)), None)
    for index, block in enumerate(module.transformer if why is None else ()):
        stream = vit_block(tracer, f"{name}.transformer.{index}", block, stream, width)
    add_points(tracer, f"{name}.norm", module.norm, tokens(stream, width), (width,))
    proj = conv_layer(f"{name}.conv_proj", module.conv_proj)
    read(tracer, proj.name, proj.producer, Value(((stream, 0),), width, ndim=4))
    output = Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=4)
    if why:
        tracer.space(stream).refuse(f"MobileViT block {name}: {why if tracer.reused(name) else f'a ViT block {why}'}")
    if tracer.reused(name):
        tracer.refuse_all((value, output), f"MobileViT block {name}: {why}")
    if module.conv_fusion is None:
        return output
    fusion = conv_layer(f"{name}.conv_fusion", module.conv_fusion)
    if value is None or value.width is None or value.layout is not None or value.flattened:
        reason = f"MobileViT block {name} concatenates them with a tensor of unknown channels"
        tracer.refuse_all((value, output), reason)
    else:
        joined = Value((*value.segments, (output.segments[0][0], value.width)), value.width + output.width,
                       revived_by=value.revived_by, ndim=4)  # fmt: skip
        read(tracer, fusion.name, fusion.producer, joined)
    return Value(((tracer.new_space(fusion), 0),), tracer.width(fusion), ndim=4)


def side_by_side_heads(
    tracer: Tracer, name: str, attention: nn.Module, index: int, proj: str, family: str = "TinyViT",
    values_width: str = "out_dim", keys: int = 2,
) -> None:  # fmt: skip
    """TinyViT's (or LeViT's) ``Attention`` at ``name``: its q/k/v rows (space ``index``), each head's q, k and v
    side by side (``keys`` blocks of ``key_dim`` rows, then ``val_dim``: LeViT's downsampling ``kv`` has only k),
    pruned in whole heads (``ChannelSpace.block``); ``proj`` reads a head's values,
    ``attention_biases`` holds a row per head (cut with it), and the cut sets ``num_heads`` and ``values_width``
    (the width of all heads' values it reshapes by). A pruned head's q, k and v are 0, its logits its bias alone,
    its output softmax(bias) @ 0 = 0; the other heads keep their width and scale."""
    space, values, leading = tracer.space(index), attention.val_dim, keys * attention.key_dim
    block = leading + values
    space.block, space.heads_of, space.head_attributes = block, name, ("num_heads", values_width)
    at = [-1 if c % block < leading else c // block * values + c % block - leading for c in range(space.width)]
    space.consumers.append(Consumer(proj, "linear", at=tuple(at)))
    head_of_row = tuple(c // block for c in range(space.width))
    space.scales.append(ChannelScale(f"{name}.attention_biases", 0, 0, at=head_of_row))
    if attention.num_heads < 2 or space.width != attention.num_heads * block:
        space.refuse(f"{family} attention {name} has a single head, or rows that are not heads × ({keys} key_dim + "
                     "val_dim)")  # fmt: skip


def tiny_vit_block(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """TinyViT's ``TinyVitBlock``, a leaf: its stream (channels last) written again by ``attn.proj``, ``local_conv``
    and ``mlp.fc2``, read by ``attn.qkv`` (its rows refused) and ``mlp.fc1`` (a hidden space of its own)."""
    name = str(node.target)
    usable = one_whole_space(value) and value.width == module.dim and value.channels_at(-1) and not value.flattened
    if not usable or value.revived_by is not None or tracer.reused(name):
        tracer.refuse_unknown(node, [value])
        return None
    stream, width = value.segments[0][0], module.dim
    add_points(tracer, f"{name}.attn.norm", module.attn.norm, tokens(stream, width), (width,))
    qkv, proj = (PrunableLayer(f"{name}.attn.{layer}", getattr(module.attn, layer)) for layer in ("qkv", "proj"))
    read(tracer, qkv.name, qkv.producer, tokens(stream, width))
    side_by_side_heads(tracer, f"{name}.attn", module.attn, tracer.new_space(qkv), proj.name)
    stream = tracer.union(stream, tracer.new_space(proj), f"{name}'s attention residual")
    tracer.space(stream).producers.append(conv_layer(f"{name}.local_conv", module.local_conv))
    add_points(tracer, f"{name}.mlp.norm", module.mlp.norm, tokens(stream, width), (width,))
    fc1, fc2 = (PrunableLayer(f"{name}.mlp.{layer}", getattr(module.mlp, layer)) for layer in ("fc1", "fc2"))
    read(tracer, fc1.name, fc1.producer, tokens(stream, width))
    tracer.space(tracer.new_space(fc1)).consumers.append(Consumer(fc2.name, "linear"))
    stream = tracer.union(stream, tracer.new_space(fc2), f"{name}'s MLP residual")
    return Value(((stream, 0),), width, ndim=4, channels_last=True)


def register() -> None:
    from timm.models.mobilevit import MobileVitBlock
    from timm.models.tiny_vit import TinyVitBlock

    register_module_handler(MobileVitBlock, mobilevit_block)
    register_module_handler(TinyVitBlock, tiny_vit_block)
