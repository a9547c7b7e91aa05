"""Which network of a LightningModule ChannelPruning prunes (its ``module`` setting)."""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)


def find_network(pl_module: L.LightningModule, attribute: str | None) -> nn.Module:
    """``pl_module.<attribute>``; ``"auto"``: its ``model`` if it has one, else the module itself, else — when it
    defines no ``forward`` — the one submodule with weights it holds; None or "": the module itself."""
    if attribute in (None, ""):
        return pl_module
    if attribute == "auto":
        candidate = getattr(pl_module, "model", None)
        if isinstance(candidate, nn.Module):
            return candidate
        return pl_module if defines_forward(pl_module) else held_network(pl_module)
    candidate = getattr(pl_module, attribute, None)
    if not isinstance(candidate, nn.Module):
        raise ConfigError(f"mask.module={attribute!r} is not a submodule of {type(pl_module).__name__}")
    return candidate


def defines_forward(module: nn.Module) -> bool:
    return type(module).forward is not L.LightningModule.forward


def held_network(pl_module: L.LightningModule) -> nn.Module:
    """The network a LightningModule without ``forward`` holds: its one direct submodule with weights."""
    held = [(name, child) for name, child in pl_module.named_children() if next(child.parameters(), None) is not None]
    if len(held) != 1:
        raise ConfigError(
            f"{type(pl_module).__name__} defines no forward, so it cannot be traced; point ChannelPruning at the "
            f"network it holds with module=<attribute> (its submodules with weights: "
            f"{', '.join(name for name, _ in held) or 'none'})"
        )
    name, network = held[0]
    log.info("%s defines no forward: pruning the network it holds, %s", type(pl_module).__name__, name)
    return network
