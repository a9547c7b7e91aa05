"""Pointwise ops: each keeps channel c in channel c. Most keep a zero channel at zero (ReLU, dropout); a few
revive it (``sigmoid(0) = ½``), which is fine only where the result multiplies another factor (a gate)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from pruneflow.graph.registry import (
    module_rule,
    register_function_handler,
    register_method_handler,
    register_module_handler,
)
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

F = torch.nn.functional

ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, StochasticDepth,
)  # fmt: skip
# Channel-preserving, but f(0) ≠ 0: a masked channel comes back to life (fine only inside a product).
REVIVING_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
ZERO_PRESERVING_FUNCTIONS = (
    torch.relu, F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu, F.hardswish, F.mish, torch.tanh, F.dropout,
    torch.square,  # MetaFormer's SquaredReLU: relu(x)²
    stochastic_depth,  # drops whole samples (or rows): each kept one is scaled, every channel alike
)  # fmt: skip
REVIVING_FUNCTIONS = (torch.sigmoid, F.sigmoid, F.hardsigmoid)
ZERO_PRESERVING_METHODS = ("relu", "relu_", "tanh", "square", "contiguous", "clone")
REVIVING_METHODS = ("sigmoid",)


def passes(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    """Channel c stays channel c, and zero stays zero."""
    return value


def revived(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    """Channel c stays channel c, but a masked channel's 0 becomes f(0) ≠ 0: noted, for a reader to refuse."""
    return None if value is None else replace(value, revived_by=tracer.describe(node))


CHANNELWISE_MODULES: list[type[nn.Module]] = []  # every module type with a pointwise rule
REVIVING_TYPES: list[type[nn.Module]] = []  # those of them that turn a 0 into f(0) ≠ 0


def register_pointwise(module_types: tuple[type[nn.Module], ...], preserves_zero: bool = True) -> None:
    """Declare ``module_types`` pointwise: channel c stays channel c (and zero stays zero, unless not)."""
    register_module_handler(module_types, module_rule(passes if preserves_zero else revived), leaf=False)
    CHANNELWISE_MODULES.extend(module_types)
    if not preserves_zero:
        REVIVING_TYPES.extend(module_types)


def is_pointwise(module: nn.Module) -> bool:
    """Whether ``module`` computes each channel from that channel alone (an activation, a dropout)."""
    return isinstance(module, tuple(CHANNELWISE_MODULES))


def keeps_zero(module: nn.Module) -> bool:
    """Whether ``module`` is pointwise and keeps a masked channel's 0 at 0 (not a sigmoid)."""
    return is_pointwise(module) and not isinstance(module, tuple(REVIVING_TYPES))


register_pointwise(ZERO_PRESERVING_MODULES)
register_pointwise(REVIVING_MODULES, preserves_zero=False)
register_function_handler(ZERO_PRESERVING_FUNCTIONS, passes)
# ``stochastic_depth`` called from the model's own forward stays one op, as it is inside torchvision
register_function_handler(stochastic_depth, passes, autowrap=True)
register_function_handler(REVIVING_FUNCTIONS, revived)
register_method_handler(ZERO_PRESERVING_METHODS, passes)
register_method_handler(REVIVING_METHODS, revived)
