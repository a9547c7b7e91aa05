"""Channel importance criteria: small, swappable scorers; the lowest-scoring channels are pruned first.

Each criterion maps a ``PrunableLayer`` (and, for ``taylor``, gradients gathered during training) to
one score per output channel. Selection itself (how many, never all) lives in ``select_channels``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pruneflow.errors import ConfigError
from pruneflow.pruning.channels import PrunableLayer


@dataclass
class ScoringContext:
    """What criteria may read besides the layer: the seed, and Σ w·∂L/∂w per channel for ``taylor``."""

    seed: int = 0
    taylor_scores: dict[str, Tensor] = field(default_factory=dict)


def producer_weight(layer: PrunableLayer) -> Tensor:
    """The conv's effective weight, flattened per output channel (works under parametrizations too)."""
    return layer.conv.weight.detach().flatten(1)


def l1_score(layer: PrunableLayer, context: ScoringContext) -> Tensor:
    return producer_weight(layer).abs().sum(1)


def l2_score(layer: PrunableLayer, context: ScoringContext) -> Tensor:
    return producer_weight(layer).norm(dim=1)


def random_score(layer: PrunableLayer, context: ScoringContext) -> Tensor:
    # Seeded by (seed, layer name) only, so every process of a distributed run draws the same channels.
    generator = torch.Generator().manual_seed(context.seed * 1_000_003 + zlib.crc32(layer.name.encode()))
    return torch.rand(layer.num_channels, generator=generator)


def bn_gamma_score(layer: PrunableLayer, context: ScoringContext) -> Tensor:
    if layer.norm is None or layer.norm.weight is None:
        raise ConfigError(f"mask.criterion='bn_gamma' needs an affine BatchNorm after {layer.name}, which has none")
    return layer.norm.weight.detach().abs()


def taylor_score(layer: PrunableLayer, context: ScoringContext) -> Tensor:
    """First-order Taylor estimate of the loss change from removing a channel: |Σ w·∂L/∂w| over its kernel."""
    if layer.name not in context.taylor_scores:
        raise RuntimeError(f"no gradients were gathered for {layer.name} before selecting by taylor")
    return context.taylor_scores[layer.name].abs()


def taylor_contribution(layer: PrunableLayer) -> Tensor | None:
    """Σ w·∂L/∂w per output channel for the gradient now in ``.grad``; call after backward."""
    weight = layer.conv.weight
    grad = weight.grad if weight.grad is not None else _parametrized_grad(layer)
    if grad is None:
        return None
    return (weight.detach() * grad).flatten(1).sum(1)


def _parametrized_grad(layer: PrunableLayer) -> Tensor | None:
    parametrizations = getattr(layer.conv, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        return None
    return parametrizations["weight"].original.grad


Criterion = Callable[[PrunableLayer, ScoringContext], Tensor]

CRITERIA: dict[str, Criterion] = {
    "l1": l1_score,
    "l2": l2_score,
    "random": random_score,
    "bn_gamma": bn_gamma_score,
    "taylor": taylor_score,
}
EXPLICIT = "explicit"
CRITERION_NAMES = (*CRITERIA, EXPLICIT)


def channels_to_prune(num_channels: int, amount: float) -> int:
    """How many of ``num_channels`` output channels ``amount`` removes: ⌊amount·C⌋, never all of them."""
    return min(int(amount * num_channels + 1e-9), num_channels - 1)


def select_channels(scores: Tensor, count: int, already_pruned: Tensor) -> Tensor:
    """Boolean mask (True = pruned) of the ``count`` lowest-scoring channels, keeping those pruned already.

    Ties break by channel index, so the choice is deterministic on every process.
    """
    pruned = already_pruned.clone()
    extra = count - int(pruned.sum())
    if extra <= 0:
        return pruned
    scores = scores.detach().float().cpu().clone()
    scores[pruned.cpu()] = float("inf")
    order = torch.sort(scores, stable=True).indices
    pruned[order[:extra].to(pruned.device)] = True
    return pruned
