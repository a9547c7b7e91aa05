"""The cut of the live network inside a running fit, on Lightning's side: what it did, the DDP re-wrap, and
the checkpoints it writes (``pruneflow.compaction.while_training`` cuts the modules and carries the
optimizers).

A checkpoint written after the cut holds the smaller network and records its widths (``cut_sizes``). A
fresh network takes those widths in a load-state-dict pre-hook, before its weights load — the point that a
plain ``Trainer.fit(ckpt_path=...)`` reaches before the callback's own state, so the hook reads the widths
from the checkpoint Lightning is restoring. Any other shape mismatch is left to PyTorch's own error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from pruneflow.errors import ConfigError, lightning_internal
from pruneflow.pruning.masking import Masking
from pruneflow.pruning.plan import PruningPlan, steps_per_epoch

log = logging.getLogger(__name__)


@torch.no_grad()
def eval_outputs(network: nn.Module, inputs: Tensor) -> Tensor:
    """``network``'s outputs in eval mode (BatchNorm's running statistics untouched, no dropout draws), every
    module's training flag restored after. Through ``forward``, not ``__call__``: a network compiled in place
    would otherwise compile an eval-mode graph (twice, around a cut) for this one look."""
    flags = [(module, module.training) for module in network.modules()]
    network.eval()
    try:
        return network.forward(inputs).float()
    finally:
        for module, training in flags:
            module.training = training


def rewrap_distributed(trainer: L.Trainer) -> None:
    """DDP reduces the gradients of the parameters it was built over: after a cut, wrap the network anew,
    as the strategy first did (its DDP arguments and communication hooks), so the cut parameters are the
    ones reduced. Every rank cuts the same channels at the same step (the masks are rank 0's), and the new
    wrapper's construction broadcasts rank 0's weights, which are already equal on every rank."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
        log.info("the cut network is wrapped anew in DistributedDataParallel on rank %d", trainer.global_rank)


def example_images(batch: Any, pl_module: L.LightningModule) -> Tensor | None:
    images = batch[0] if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor) else None
    if images is not None and getattr(pl_module, "channels_last", False) and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


class LiveCut:
    """Cuts the pruned channels out of the live network once; ``report``: what it did (None before)."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.sizes: dict[str, dict[str, int]] = {}  # constructor widths of every rebuilt module

    @staticmethod
    def check_setup(trainer: L.Trainer) -> None:
        """At setup: refuse multi-process strategies other than DDP, which shard or hold the parameters, and
        callbacks that hold a copy of the network at its full widths, which no cut reaches."""
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ConfigError(
                f"mask.cut_at_epoch/cut_at_step cannot cut under {type(trainer.strategy).__name__} with "
                f"{trainer.world_size} processes (it shards or holds the parameters it was given); accepted: one "
                "device or strategy=ddp, or cut after training with compact=true"
            )
        for callback in trainer.callbacks:
            if isinstance(callback, StochasticWeightAveraging):
                raise ConfigError(
                    "mask.cut_at_epoch/cut_at_step cannot cut under StochasticWeightAveraging (it averages a copy of "
                    "the network made at setup, at the full widths); accepted: drop one of the two, or cut after "
                    "training with compact=true"
                )

    @staticmethod
    def check_start(trainer: L.Trainer, plan: PruningPlan) -> None:
        """Before the first step, once the epoch's length is known: a cut step against the pruning epochs (and an
        epoch against the pruning steps), and the optimizers."""
        plan.check_cut(steps_per_epoch(trainer))
        LiveCut.check_optimizers(trainer)

    @staticmethod
    def check_optimizers(trainer: L.Trainer) -> None:
        """Before training: refuse by name the optimizers whose state no cut can carry."""
        from pruneflow.compaction.while_training import refuse_uncarriable  # compaction imports this package

        refuse_uncarriable(trainer.optimizers)

    def cut(
        self, trainer: L.Trainer, pl_module: L.LightningModule, network: nn.Module, masking: Masking, final: float,
        batch: Any, remove_masks: Callable[[], None],
    ) -> dict[str, float]:  # fmt: skip
        """Cut ``masking``'s pruned channels out of ``network`` and carry the optimizers over; ``remove_masks``
        takes the masking machinery off first. Training goes on, on the smaller network. Refused unless the
        ``final`` amount is pruned. Returns the report's figures."""
        if masking.pruned_amount < final:  # `check_start` refuses this before training
            raise ConfigError(
                f"mask.cut_at_epoch/cut_at_step: the cut is due at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}, before pruning finished ({masking.pruned_amount:.3g} of {final:.3g} "
                "pruned); cut at or after the last pruning step"
            )
        pruned = masking.pruned
        from pruneflow.compaction.cut import compact
        from pruneflow.compaction.while_training import swap_in

        compaction = compact(network, pruned)  # on a copy: the live network is untouched if it refuses
        images = example_images(batch, pl_module)
        masked_logits = None if images is None else eval_outputs(network, images)
        remove_masks()
        result = swap_in(network, compaction, trainer.optimizers, None if images is None else images[:1])
        rewrap_distributed(trainer)
        self.sizes = result.sizes
        self.report = result.metrics(trainer.global_step)
        if masked_logits is not None:
            # What the cut changed, on this batch: ~1e-6 for an exact cut, the gap where channels were alive.
            cut_logits = eval_outputs(network, images)
            self.report["cut/batch_max_abs_diff"] = float((cut_logits - masked_logits).abs().max())
            if masked_logits.ndim == 2:
                agreement = (cut_logits.argmax(1) == masked_logits.argmax(1)).float().mean()
                self.report["cut/batch_top1_agreement"] = float(agreement)
        log.info(
            "step %d: cut %d of %d channels out of the network (params %d → %d); training goes on without "
            "them, and the telemetry stops: the pruned channels no longer exist",
            trainer.global_step, result.channels[0] - result.channels[1], result.channels[0], *result.params,
        )  # fmt: skip
        return {key: float(value) for key, value in self.report.items()}

    # -- checkpoints written after the cut ----------------------------------------------------------
    def watch_loads(
        self, trainer: L.Trainer, network: nn.Module, state_key: str, remove_masks: Callable[[], None]
    ) -> None:
        """Before ``network``'s weights load from a checkpoint this cut wrote, rebuild it at the recorded widths
        (and ``remove_masks``, which fit no more)."""

        def take_cut_shape(module: nn.Module, *_: Any) -> None:
            # Lightning loads the weights before any callback state, and no public hook runs before them: read
            # the widths from the checkpoint it is restoring, an internal of its checkpoint connector (empty
            # outside a restore, e.g. a user's own load_state_dict in setup()).
            checkpoint = lightning_internal(
                trainer, "_checkpoint_connector._loaded_checkpoint", "restoring a checkpoint written after a cut"
            ) or {}  # fmt: skip
            state = (checkpoint.get("callbacks") or {}).get(state_key) or {}
            if state.get("cut"):
                remove_masks()
                self.adopt(module, state["cut_sizes"])

        network.register_load_state_dict_pre_hook(take_cut_shape)

    def adopt(self, network: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> None:
        from pruneflow.compaction.cut import apply_sizes

        apply_sizes(network, sizes)
        self.sizes = {name: dict(widths) for name, widths in sizes.items()}

    def state_dict(self) -> dict[str, Any]:
        if self.report is None:
            return {"cut": {}, "cut_sizes": {}}
        return {"cut": dict(self.report), "cut_sizes": {name: dict(widths) for name, widths in self.sizes.items()}}

    def load_state_dict(self, state: Mapping[str, Any], network: nn.Module) -> None:
        """After the weights: the network has the cut widths already (the pre-hook); ``adopt`` only checks."""
        self.adopt(network, state["cut_sizes"])
        self.report = dict(state["cut"])
