"""timm's building blocks, where timm is installed (an optional extra): its norm-and-activation modules
(``BatchNormAct2d``: a BatchNorm whose forward calls ``F.batch_norm``, then its dropout and activation, all
channel-wise), its LayerNorms over the channels, its ``*Same`` convs (a conv after a padding computed from the
input's size), its activations, its layer scales (a per-channel parameter, cut with the channels), and the modules
and functions timm itself declares opaque to ``torch.fx`` (``timm.layers._fx``): kept whole, so a model traces
and only the spaces reaching them are refused, not the whole model."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers import timm_attention, tokens
from pruneflow.graph.handlers.norms import layer_norm, norm
from pruneflow.graph.handlers.pointwise import is_pointwise, register_pointwise
from pruneflow.graph.handlers.producers import producer
from pruneflow.graph.layers import LAYER_NORMS
from pruneflow.graph.leaves import register_leaf
from pruneflow.graph.registry import AUTOWRAP_FUNCTIONS, LEAVES, register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

REGISTERED: list[bool] = []  # once: timm's rules go into the tables the first time a trace finds timm imported


def norm_act(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A BatchNorm followed by its dropout and activation, all channel-wise: a norm, its channel point at its
    output, after the activation (so a reviving one, sigmoid, is masked too)."""
    unknown = [type(part).__name__ for part in (module.drop, module.act) if not is_pointwise(part)]
    if unknown:
        tracer.refuse(value, f"{type(module).__name__} {node.target} applies {unknown[0]}, not known channel-wise")
        return None
    return norm(tracer, node, module, value)


def register_if_imported() -> None:
    """Register timm's rules once timm is imported (by the model being traced): importing timm here would cost
    every user of the graph its import time."""
    if "timm" in sys.modules and not REGISTERED:
        register()


def register() -> None:
    import timm.layers as timm_layers
    from timm.layers import _fx as timm_fx
    from timm.layers import activations as timm_activations

    REGISTERED.append(True)
    timm_attention.register()
    tokens.register()
    zero_preserving = ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish", "Tanh")
    register_pointwise(tuple(getattr(timm_activations, name) for name in zero_preserving))
    register_pointwise((timm_activations.Sigmoid, timm_activations.HardSigmoid), preserves_zero=False)
    register_module_handler(timm_layers.BatchNormAct2d, norm_act)
    register_module_handler(timm_layers.Conv2dSame, producer)
    LAYER_NORMS[timm_layers.LayerNorm2d] = 1
    LAYER_NORMS[timm_layers.LayerNorm] = -1
    register_module_handler((timm_layers.LayerNorm2d, timm_layers.LayerNorm), layer_norm)
    register_leaf(timm_layers.LayerScale, channel_dim=-1, follows=("gamma",))
    register_leaf(timm_layers.LayerScale2d, channel_dim=1, follows=("gamma",))
    for leaf in timm_fx.get_notrace_modules():  # timm's own: traced whole, refused where reached unless taught
        LEAVES.setdefault(leaf, lambda module: True)
    AUTOWRAP_FUNCTIONS.extend(f for f in timm_fx.get_notrace_functions() if f not in AUTOWRAP_FUNCTIONS)
