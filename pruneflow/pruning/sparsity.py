"""Sparse training before pruning (``mask.regularizer``): a penalty that pushes whole coupled groups toward zero, so
that what is pruned later carries little, and the telemetry that shows when that is so.

``group_lasso`` (DepGraph's group regulariser, Torch-Pruning's ``GroupNormPruner``): λ Σ_c ‖g_c‖₂ over every
channel ``c`` of every selected space, ``g_c`` all the weights removed with it — its producers' rows and its
consumers' columns (``importance.GroupMembers``), so a channel goes to zero everywhere it lives at once.
``bn_l1`` (network slimming, Liu et al. 2017; Torch-Pruning's ``BNScalePruner``): λ Σ|γ| over the norms of the
selected spaces. The penalty's gradient is added to ``.grad`` once per optimizer step, before the step, for the
first ``regularizer_epochs`` epochs (null: until the last pruning event).

TensorBoard: ``sparsity/group_norms`` (a histogram of every channel's group norm, or |γ|) and
``sparsity/fraction_below`` — the share of channels whose norm is under ``SMALL`` of their space's mean: when it
reaches the amount to prune, pruning removes channels that carry almost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from pruneflow.errors import ConfigError, is_count
from pruneflow.graph import ChannelSpace, is_producer
from pruneflow.pruning.importance import GroupMembers

log = logging.getLogger(__name__)

REGULARIZERS = ("group_lasso", "bn_l1")
SMALL = 0.05  # a channel's norm under this share of its space's mean counts as pruned-ready


class SparseTraining:
    """``regularizer`` of ``strength`` λ over the selected spaces for the first ``epochs`` epochs."""

    def __init__(self, regularizer: str, strength: float, epochs: int | None) -> None:
        if regularizer not in REGULARIZERS:
            raise ConfigError(f"unknown mask.regularizer {regularizer!r}; choose one of: {', '.join(REGULARIZERS)}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength > 0:
            raise ConfigError(f"mask.regularizer_strength must be a number > 0, got {strength!r}")
        if epochs is not None and (not is_count(epochs) or epochs < 1):
            raise ConfigError(f"mask.regularizer_epochs must be a positive integer or null, got {epochs!r}")
        self.regularizer, self.strength, self.epochs = regularizer, float(strength), epochs
        self.members = GroupMembers()
        self.spaces: list[ChannelSpace] = []

    def bind(self, network: nn.Module, spaces: Sequence[ChannelSpace]) -> None:
        self.members.bind(network)
        self.spaces = list(spaces)

    def active(self, epoch: int, pruning_done: bool) -> bool:
        return (epoch < self.epochs) if self.epochs is not None else not pruning_done

    def norms(self, space: ChannelSpace) -> Tensor:
        """Each channel's group norm (``group_lasso``) or summed |γ| (``bn_l1``), differentiable."""
        if self.regularizer == "bn_l1":
            gammas = [layer.norm.weight.abs() for layer in space.producers
                      if layer.norm is not None and layer.norm.weight is not None]  # fmt: skip
            for point in space.points:  # a norm reading the space among other channels: its entries of the space
                if not is_producer(point.module) and getattr(point.module, "weight", None) is not None:
                    channels, entries = point.placed(space.width)
                    weight = point.module.weight
                    row = torch.zeros(space.width, device=weight.device, dtype=weight.dtype)
                    gammas.append(row.index_put((channels.to(weight.device),), weight[entries.to(weight.device)].abs()))
            return torch.stack(gammas).sum(0) if gammas else torch.zeros(0)
        members = self.members.rows(space, lambda module: module.weight, detach=False)
        return torch.cat(members, 1).pow(2).sum(1).sqrt()

    def add_gradients(self) -> None:
        """λ · ∂(Σ norms)/∂w added to every weight's ``.grad`` (the step's whole gradient is there already)."""
        with torch.enable_grad():
            penalty = sum(self.norms(space).sum() for space in self.spaces)
            if not isinstance(penalty, Tensor) or not penalty.requires_grad:
                return
            parameters = [p for p in self._parameters() if p.requires_grad]
            grads = torch.autograd.grad(self.strength * penalty, parameters, allow_unused=True)
        for parameter, grad in zip(parameters, grads, strict=True):
            if grad is None:
                continue
            if parameter.grad is None:
                parameter.grad = grad.detach()
            else:
                parameter.grad.add_(grad)

    def _parameters(self) -> list[Tensor]:
        modules = []
        for space in self.spaces:
            if self.regularizer == "bn_l1":
                modules += _norms(space)
            else:
                modules += [layer.producer for layer in space.producers]
                modules += [module for _, module in self.members.consumers(space)]
        unique = {id(module.weight): module.weight for module in modules if getattr(module, "weight", None) is not None}
        return list(unique.values())

    @rank_zero_only
    def log(self, trainer: L.Trainer) -> None:
        """The histogram of channel norms and the share of channels under ``SMALL`` of their space's mean."""
        with torch.no_grad():
            norms = [self.norms(space).detach().float() for space in self.spaces]
        norms = [n for n in norms if n.numel()]
        if not norms:
            return
        small = sum(int((n < SMALL * n.mean()).sum()) for n in norms) / sum(n.numel() for n in norms)
        for logger in trainer.loggers:
            logger.log_metrics({"sparsity/fraction_below": small}, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("sparsity/group_norms", torch.cat(norms).cpu(), trainer.global_step)


def _norms(space: ChannelSpace) -> list[nn.Module]:
    """The BatchNorms and LayerNorms of a space: its producers' and its channel points' (whole: every entry's γ is
    pushed, the space's and the others' a point reads)."""
    norms = [layer.norm for layer in space.producers if layer.norm is not None]
    return norms + [point.module for point in space.points if not is_producer(point.module)]


def make_sparse_training(regularizer: str | None, strength: float, epochs: int | None) -> SparseTraining | None:
    return None if regularizer is None else SparseTraining(regularizer, strength, epochs)
