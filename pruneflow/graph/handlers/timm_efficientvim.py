"""EfficientViM's HSM-SSD mixer (``HSMSSD``: hidden state mixer based state space duality), kept whole and read as
the walk would read its insides, its input a map (B, C, H, W) and its output the pair (y, h).

Its input x, flattened to (B, C, L), is read by ``BCdt_proj`` (a 1-D conv) and multiplied by the state weights:
``h = x @ (a · b)ᵀ`` is (B, C, S), channel c of h from channel c of x alone (a sum over the positions, no bias), so a
masked channel of x is a 0 row of h, and ``hz_proj`` reads h's channels as x's. ``hz_proj`` writes 2 × ``d_inner``
rows, split in halves and joined channel for channel (``h · act(z) + h · D``: a gate, a masked pair 0 on both
sides), so they are cut in pairs (``ChannelSpace.groups`` 2, the split's ``d_inner`` set by the cut: ``EqualParts``);
``out_proj`` reads the first half and writes the output space: h (B, C, S) and ``y = h @ c`` (B, C, L), channel for
channel again, reshaped back to the map by ``-1`` (the kept width). The state dims (``BCdt_proj``'s rows, 3 ×
``state_dim``: b, c and dt, carried by the depthwise ``dw``) are contracted with the positions by the matmuls and
returned as h's positions, which the model's head normalises and averages: refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.reorderings import EqualParts
from pruneflow.graph.records import Consumer, PrunableLayer, SplitSizes
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Parts, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def plain_conv(name: str, layer: nn.Module) -> PrunableLayer | str:
    """A ``ConvLayer1d``/``ConvLayer2d`` at ``name`` as a producer (its conv, its BatchNorm); why not, where it also
    activates."""
    if getattr(layer, "act", None) is not None:
        return f"{name} applies {type(layer.act).__name__} after its conv"
    norm = (f"{name}.norm", layer.norm) if getattr(layer, "norm", None) is not None else (None, None)
    return PrunableLayer(f"{name}.conv", layer.conv, *norm)


def hidden_state_mixer(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """EfficientViM's ``HSMSSD``, a leaf: ``BCdt_proj`` and ``hz_proj`` read its input's channels, ``hz_proj``'s rows
    cut in pairs and read by ``out_proj`` (its first half), which writes both outputs; the state dims refused."""
    name = str(node.target)
    layers = {part: plain_conv(f"{name}.{part}", getattr(module, part)) for part in ("BCdt_proj", "dw", "hz_proj",
                                                                                     "out_proj")}  # fmt: skip
    reason = tracer.reused(name) or next((layer for layer in layers.values() if isinstance(layer, str)), None)
    if reason:
        tracer.refuse(value, f"HSM-SSD mixer {name}: {reason}")
        return None
    for part in ("BCdt_proj", "hz_proj"):
        read(tracer, layers[part].name, layers[part].producer, value)
    states = tracer.space(tracer.new_space(layers["BCdt_proj"]))
    states.producers.append(layers["dw"])
    states.refuse(f"HSM-SSD mixer {name} contracts its state dims (b, c, dt) with the positions in its matmuls and "
                  "returns them as its hidden state's positions")  # fmt: skip
    hidden = tracer.space(tracer.new_space(layers["hz_proj"]))
    hidden.groups = tracer.joined_groups(hidden, 2, f"HSM-SSD mixer {name}'s h · act(z)")
    hidden.splits.append(SplitSizes(name, (module.d_inner, module.d_inner)))
    first_half = tuple(c if c < module.d_inner else -1 for c in range(hidden.width))
    hidden.consumers.append(Consumer(layers["out_proj"].name, "conv", at=first_half))
    output = tracer.new_space(layers["out_proj"])
    width = tracer.width(layers["out_proj"])
    return Parts((Value(((output, 0),), width, ndim=4), Value(((output, 0),), width, ndim=3)))


def register() -> None:
    from timm.models.efficientvim import HSMSSD

    register_module_handler(HSMSSD, hidden_state_mixer)
    register_split_sizes(HSMSSD, EqualParts("d_inner"))
