"""Building blocks shared by pruneflow's models: the activation registry and conv → norm → act.

The activation is a config switch because it decides what pruning does: ReLU has zero slope at 0, so
a pruned channel whose BatchNorm outputs β ≤ 0 passes no gradient back, while SiLU, GELU and
LeakyReLU pass gradient at 0 and let a "zeroed" producer kernel drift.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pruneflow.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of: {', '.join(sorted(ACTIVATIONS))}") from None


def check_activation(name: str) -> str:
    """Validate an activation name early, in a model's ``__init__``."""
    make_activation(name)
    return name


def conv_bn_act(in_channels: int, out_channels: int, activation: str, stride: int = 1) -> list[nn.Module]:
    """3×3 conv (no bias: the BatchNorm's β plays that role) → BatchNorm2d → activation, as a flat list.

    Returned flat so a model can lay the modules out in one ``nn.Sequential`` and a config can point
    at ``features.4`` by index.
    """
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        make_activation(activation),
    ]
