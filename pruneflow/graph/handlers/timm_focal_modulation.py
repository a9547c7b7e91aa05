"""FocalNet's ``FocalModulation`` (timm), kept whole: its query and context rows are two spaces, its gates stay.

Its forward, on a map ``x`` (B, C, H, W)::

    q, ctx, gates = split(f(x), [C, C, L + 1])          # one 1 × 1 conv's rows, sizes held in ``input_split``
    for l: ctx = gelu(dwconv_l(ctx)); ctx_all += ctx * gates[:, l:l+1]
    ctx_all += gelu(mean(ctx)) * gates[:, L:]           # a gate is one value per position, for every channel
    out = proj(norm(q * h(ctx_all)))

The depthwise convs carry context channel c, each gate multiplies every channel alike and ``h`` reads them: the
context rows of ``f`` and the depthwise convs are one space, read by ``h``. ``q * h(...)`` multiplies query channel c
by ``h``'s row c: ``f``'s query rows and ``h``'s rows are one space, read by ``proj``. ``f``'s rows are points of
both (masked at its output, their entries cut), its gate rows are in neither and stay. Under ``activation`` masks a
pruned context channel is 0 after each depthwise conv (masked there; GELU(0) = 0, a mean of zeros is 0), so ``h``
reads nothing from it; a pruned query channel is 0 at ``f``'s output and at ``h``'s, so its product is 0 and ``proj``
reads nothing from it: the cut computes the masked network. The cut sets ``input_split``'s first two sizes to the
channels each space keeps. The stream it reads is read by ``f``; ``proj`` writes its output, a space of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.records import ChannelPoint, Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def focal_modulation(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``FocalModulation``, a leaf: ``f`` reads the stream; its context rows and the depthwise convs are one space
    read by ``h``, its query rows and ``h``'s one space read by ``proj``; ``proj`` writes the output."""
    name = str(node.target)
    read(tracer, f"{name}.f", module.f, value)
    reason = tracer.reused(name) or unhandled_variant(module)
    dim, shape = module.h.out_channels, (1, module.f.out_channels, 1, 1)
    context = None
    for level in range(module.focal_level):
        layer = PrunableLayer(f"{name}.focal_layers.{level}.0", module.focal_layers[level][0])
        index = tracer.new_space(layer)
        context = index if context is None else tracer.union(context, index, f"focal modulation {name}'s context")
    query = tracer.new_space(PrunableLayer(f"{name}.h", module.h))
    for index, reader, start, slot in ((context, "h", dim, 1), (query, "proj", 0, 0)):
        space = tracer.space(index)
        space.consumers.append(Consumer(f"{name}.{reader}", "conv"))
        space.points.append(ChannelPoint(f"{name}.f", module.f, start, shape))
        space.held_by.append((name, f"input_split[{slot}]"))
        if reason is not None:
            space.refuse(f"focal modulation {name} {reason}")
    output = tracer.new_space(PrunableLayer(f"{name}.proj", module.proj))
    return Value(((output, 0),), module.proj.out_channels, ndim=4)


def unhandled_variant(module: nn.Module) -> str | None:
    """Why its query and context rows cannot be cut (None: they can)."""
    if not all(type(getattr(module, part)) is nn.Conv2d for part in ("f", "h", "proj")):
        return "projects with other layers than plain convs"
    if not isinstance(module.norm, nn.Identity):
        return "normalises its modulated query over the channels (use_post_norm)"
    depthwise = (len(layer) == 2 and type(layer[0]) is nn.Conv2d and layer[0].groups == layer[0].in_channels
                 == layer[0].out_channels and isinstance(layer[1], nn.GELU) for layer in module.focal_layers)
    if module.focal_level < 1 or not all(depthwise):
        return "has context layers other than a depthwise conv and a GELU"
    return None


def register() -> None:
    from timm.models.focalnet import FocalModulation

    register_module_handler(FocalModulation, focal_modulation)
