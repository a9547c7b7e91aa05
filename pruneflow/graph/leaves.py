"""Teaching the graph a layer in a few lines: ``register_leaf`` declares a module type channel-wise (its output
channel c is computed from its input channel c alone) with the parameters that follow the channels, and builds
its handler. The graph then keeps the layer whole when tracing, carries the spaces through it, and the cut slices
the declared parameters with the channels.

    class Scale(nn.Module):  # y = x · w, one weight per channel
        def __init__(self, channels):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x):
            return x * self.weight.view(1, -1, 1, 1)

    register_leaf(Scale, follows=("weight",))

A layer that turns a zero channel into something else (it adds a bias, ``sigmoid``) is declared with
``preserves_zero=False``: a masked channel is alive again after it, so a reader after it refuses the space
unless a norm masks it again. For anything else (a layer that writes channels of its own, reads several
tensors, reorders channels), write a handler and register it with ``register_module_handler``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.records import ChannelScale
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


@dataclass(frozen=True)
class ChannelwiseLeaf:
    """A module whose output channel c depends on its input channel c only, the channels at ``channel_dim`` (1:
    (N, C, ...), -1: channels last) of both; ``follows``: its parameters with one entry per channel along their
    dim 0, cut with the channels; ``preserves_zero``: whether a zero channel stays zero."""

    channel_dim: int = 1
    follows: tuple[str, ...] = ()
    preserves_zero: bool = True

    def __call__(self, tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
        if value is None:
            return None
        name = str(node.target)
        reason = tracer.reused(name) or self.unreadable(module, value)
        if reason:
            tracer.refuse(value, f"{type(module).__name__} {name} {reason}")
            return None
        for parameter in self.follows:
            for index, offset in value.segments:
                tracer.space(index).scales.append(ChannelScale(f"{name}.{parameter}", 0, offset))
        return value if self.preserves_zero else replace(value, revived_by=tracer.describe(node))

    def unreadable(self, module: nn.Module, value: Value) -> str | None:
        """Why the layer cannot carry ``value``'s channels through (None: it can)."""
        if value.flattened or not value.channels_at(self.channel_dim):
            return f"reads them along another dim than {self.channel_dim}"
        if self.follows and value.layout is not None:
            return "holds per-channel parameters of channels reordered on their way"
        for parameter in self.follows:
            tensor = getattr(module, parameter, None)
            if not isinstance(tensor, nn.Parameter) or tensor.ndim < 1 or tensor.shape[0] != value.width:
                return f"has no parameter {parameter!r} with one entry per channel ({value.width}) along dim 0"
        return None


def register_leaf(
    module_type: type[nn.Module], channel_dim: int = 1, follows: tuple[str, ...] = (), preserves_zero: bool = True
) -> ChannelwiseLeaf:
    """Declare ``module_type`` channel-wise: its output channel c computed from input channel c alone, along
    ``channel_dim`` (1 or -1), with the parameters ``follows`` (one entry per channel along dim 0) cut with the
    channels, a zero channel kept at zero unless ``preserves_zero=False``. Returns the handler it registers."""
    if channel_dim not in (1, -1):
        raise ValueError(f"register_leaf: channel_dim={channel_dim!r}; the graph follows channels at dim 1 or -1")
    if isinstance(follows, str):
        follows = (follows,)
    handler = ChannelwiseLeaf(channel_dim, tuple(follows), preserves_zero)
    register_module_handler(module_type, handler)
    return handler
