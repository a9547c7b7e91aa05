"""SwiftFormer's ``EfficientAdditiveAttention`` (timm), kept whole: its query, key and ``proj`` rows are one space.

Its forward, on tokens ``x`` (B, N, C) flattened from (B, C, H, W)::

    q = normalize(to_query(x), dim=-1); k = normalize(to_key(x), dim=-1)   # L2 over the token width
    a = normalize(q @ w_g * scale, dim=1)                                  # one logit per token, over the tokens
    out = final(proj(sum(a * q, dim=1) * k) + q)                           # back to (B, C', H, W)

``sum(a * q) * k`` multiplies query channel j by key channel j, and ``proj``'s output is added to ``q``: the rows of
``to_query``, ``to_key`` and ``proj`` are one space, read by ``proj`` and ``final`` (consumers) and by ``w_g``, one
entry per channel (``ChannelScale``, cut with them). Under ``activation`` masks, a pruned channel of ``to_query``
and ``to_key`` is exactly 0 before ``normalize``: it adds nothing to the sum of squares, so the kept channels are
normalised by the same norm as in the cut network, and stay 0 after it; ``q @ w_g`` sums 0 · w for them; the logits'
``scale`` is fixed at construction. So the cut computes the masked network. The stream it reads is read by
``to_query`` and ``to_key``; ``final`` writes its output, a space of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.records import ChannelScale, Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

ROWS = ("to_query", "to_key", "proj")


def additive_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``EfficientAdditiveAttention``, a leaf: ``to_query``/``to_key`` read the stream (N, C, H, W) as tokens and,
    with ``proj``, write one space read by ``proj``, ``final`` and ``w_g``; ``final`` writes the output."""
    name = str(node.target)
    tokens = Value(value.segments, value.width, ndim=3, channels_last=True, layout=value.layout,
                   revived_by=value.revived_by) if value is not None else None  # fmt: skip
    if value is not None and (value.flattened or not value.channels_at(1)):
        tracer.refuse(value, f"additive attention {name} reads them along another dimension than its channels")
        tokens = None
    for part in ("to_query", "to_key"):
        read(tracer, f"{name}.{part}", getattr(module, part), tokens)
    inner = tracer.new_space(PrunableLayer(f"{name}.to_query", module.to_query))
    for part in ROWS[1:]:
        layer = PrunableLayer(f"{name}.{part}", getattr(module, part))
        inner = tracer.union(inner, tracer.new_space(layer), f"additive attention {name}'s query · key + query")
    rows = tracer.space(inner)
    rows.consumers += [Consumer(f"{name}.proj", "linear"), Consumer(f"{name}.final", "linear")]
    rows.scales.append(ChannelScale(f"{name}.w_g", 0, 0))
    if reason := tracer.reused(name) or unhandled_variant(module):
        rows.refuse(f"additive attention {name} {reason}")
    output = tracer.new_space(PrunableLayer(f"{name}.final", module.final))
    if tracer.reused(name):
        tracer.spaces[output].refuse(f"additive attention {name}: {tracer.reused(name)}")
    return Value(((output, 0),), module.final.out_features, ndim=value.ndim if value is not None else 4)


def unhandled_variant(module: nn.Module) -> str | None:
    """Why its rows cannot be cut (None: they can): layers other than plain Linear ones, or a ``w_g`` that is not
    one entry per row."""
    if not all(type(getattr(module, part)) is nn.Linear for part in (*ROWS, "final")):
        return "projects with other layers than nn.Linear"
    if tuple(module.w_g.shape) != (module.to_query.out_features, 1):
        return f"has a w_g of shape {tuple(module.w_g.shape)}, not one entry per query row"
    return None


def register() -> None:
    from timm.models.swiftformer import EfficientAdditiveAttention

    register_module_handler(EfficientAdditiveAttention, additive_attention)
