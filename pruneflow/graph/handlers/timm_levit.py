"""timm's LeViT (token mode): its ``LinearNorm`` and its two attentions: ``Attention`` cut in whole heads.

``LinearNorm`` is a Linear followed by a BatchNorm1d over its tokens flattened into the batch
(``bn(x.flatten(0, 1)).reshape_as(x)``): the BatchNorm normalises each output feature on its own, so it is the
Linear's norm and its channel point (β flows into a zeroed feature), exactly as a BatchNorm after a conv; a leaf.

``Attention`` writes each head's q, k and v rows side by side (``view(B, N, heads, -1).split([key_dim, key_dim,
val_dim])``) and adds a learned bias per head to its logits (``attention_biases``): pruned in whole heads, as TinyViT's
(``side_by_side_heads``), its bias table's rows and ``proj``'s columns for the head's values with them; ``proj`` is an
activation then a ``LinearNorm``, and the activation keeps a pruned head's 0 at 0 (Hardswish). ``AttentionDownsample``'s
rows (``kv`` and a separate ``q``) are refused, in one line. The stream each attention reads (``qkv``, ``kv``, ``q``:
consumers) and the space ``proj`` writes (a producer with its BatchNorm1d) stay prunable. ``AttentionDownsample``'s
``q`` subsamples the tokens before its ``LinearNorm`` (``Downsample``: a ``view`` and a strided slice of the tokens,
every channel kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import attention_output
from pruneflow.graph.handlers.pointwise import keeps_zero
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.timm_mobile_blocks import side_by_side_heads
from pruneflow.graph.records import PrunableLayer
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


def attention_spaces(
    tracer: Tracer, name: str, module: nn.Module, inputs: dict[str, nn.Module], value: Value | None
) -> tuple[list[int], Value]:
    """An attention's ``inputs`` (``LinearNorm``s reading ``value``), each writing a space of its heads' rows, and
    its ``proj.ln`` reading its heads' values and writing its output (a new space, prunable): (the rows' spaces,
    the output)."""
    proj = linear_norm_layer(f"{name}.proj.ln", module.proj.ln)
    rows = []
    for part, linear_norm_module in inputs.items():
        layer = linear_norm_layer(f"{name}.{part}", linear_norm_module)
        read(tracer, layer.name, layer.producer, value)
        rows.append(tracer.new_space(layer))
    output = attention_output(tracer, proj, value)
    if tracer.reused(name):
        tracer.refuse(value, f"attention {name}: {tracer.reused(name)}")
        tracer.refuse(output, f"attention {name}: {tracer.reused(name)}")
    return rows, output


def levit_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``Attention``: its ``qkv`` rows, each head's q, k and v side by side, pruned in whole heads
    (``side_by_side_heads``); ``proj``'s activation keeps a pruned head's 0 at 0, or the rows are refused."""
    name = str(node.target)
    (rows,), output = attention_spaces(tracer, name, module, {"qkv": module.qkv}, value)
    side_by_side_heads(tracer, name, module, rows, f"{name}.proj.ln.linear", "LeViT", "val_attn_dim")
    if tracer.reused(name) or not keeps_zero(module.proj.act):
        act = type(module.proj.act).__name__
        reason = tracer.reused(name) or f"its activation {act} turns a pruned head's 0 into another value"
        tracer.space(rows).refuse(f"LeViT attention {name}: {reason}")
    return output


def levit_attention_downsample(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    name = str(node.target)
    rows, output = attention_spaces(tracer, name, module, {"kv": module.kv, "q.ln": module.q.ln}, value)
    reason = (f"LeViT attention {name} splits its heads by key_dim={module.key_dim} and val_dim={module.val_dim} "
              "and adds a bias per head: its q/k/v rows are kept whole")  # fmt: skip
    for index in rows:
        tracer.space(index).refuse(reason)
    return output


def register() -> None:
    from timm.models import levit

    register_module_handler(levit.LinearNorm, linear_norm)
    # the token mode only: the conv mode's attentions (``use_conv``) read (N, C, H, W) and are left to the walk
    register_module_handler(levit.Attention, levit_attention, leaf=lambda module: not module.use_conv)
    register_module_handler(
        levit.AttentionDownsample, levit_attention_downsample, leaf=lambda module: not module.use_conv
    )
