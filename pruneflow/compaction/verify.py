"""Verification: does the compacted model compute what the masked model computed? Logits compared on a test set.

The masked model is the network as trained, in eval mode, with its strategy's masks in effect (an
``activation`` mask's hooks, a ``parametrize`` mask's parametrization). Where every cut channel was
dead the two agree to float rounding; where pruned channels were alive (``weight``, ``control``, or β
leaking under ``gradient``/``hard``/``parametrize``) the accuracy gap is the honest price of the cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pruneflow.errors import ConfigError

# An activation-masked cut is exact up to float summation order, whose error grows with the logits'
# magnitude (random-weight inception_v3 reaches 2e5, where one float ulp is 0.016): the gap is judged
# relative to the largest |logit| (at least 1, so near-zero logits are held to an absolute 1e-4).
EXACT_TOLERANCE = 1e-4


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the block; every submodule's own training flag is restored afterwards."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def randomize_norms(model: nn.Module, seed: int = 0, beta_scale: float = 1.0) -> nn.Module:
    """Random γ, β (× ``beta_scale``) and running statistics in every BatchNorm, random weight and bias in
    every affine LayerNorm; returns ``model`` in eval mode.

    A freshly built BatchNorm is the identity in eval mode (a LayerNorm's affine part too), so a norm entry
    cut at the wrong index would go unnoticed when comparing a compacted network with its masked original;
    random statistics make it show.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * beta_scale)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * beta_scale)
    return model.eval()


def device_of(model: nn.Module) -> torch.device:
    tensor = next((t for t in (*model.parameters(), *model.buffers())), None)
    return torch.device("cpu") if tensor is None else tensor.device


@dataclass
class Verification:
    """Masked against compacted logits over ``images`` test images."""

    max_abs_diff: float
    agreement: float
    acc_masked: float
    acc: float
    images: int
    input_shape: tuple[int, ...]
    logit_scale: float = 1.0  # the largest |logit| of the masked model

    @property
    def max_rel_diff(self) -> float:
        """``max_abs_diff`` relative to the logits' scale (max |logit|, at least 1)."""
        return self.max_abs_diff / max(self.logit_scale, 1.0)

    @property
    def exact(self) -> bool:
        """Whether the two models compute the same function up to float rounding."""
        return self.max_rel_diff <= EXACT_TOLERANCE

    @property
    def acc_gap(self) -> float:
        """Accuracy lost by compaction (masked − compacted), in [−1, 1]."""
        return self.acc_masked - self.acc

    def metrics(self) -> dict[str, Any]:
        return {
            "compact/max_abs_diff": self.max_abs_diff,
            "compact/max_rel_diff": self.max_rel_diff,
            "compact/agreement": self.agreement,
            "compact/acc_masked": self.acc_masked,
            "compact/acc": self.acc,
            "compact/acc_gap": self.acc_gap,
            "compact/test_images": self.images,
        }


@torch.inference_mode()
def verify(masked: nn.Module, compacted: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> Verification:
    """Run both models in eval mode over ``(images, labels)`` batches (already normalised) and compare.

    ``max_abs_diff`` is the largest |Δ logit| over all images and classes (``max_rel_diff`` that over the
    largest |logit| of the masked model, at least 1), ``agreement`` the share of
    images whose top-1 class is the same; each model's accuracy is measured against the labels.
    """
    masked_device, compacted_device = device_of(masked), device_of(compacted)
    max_diff = torch.zeros((), dtype=torch.float64)
    scale = torch.zeros((), dtype=torch.float64)
    agree = correct_masked = correct = images_seen = 0
    input_shape: tuple[int, ...] = ()
    with evaluating(masked, compacted):
        for images, labels in batches:
            reference = masked(images.to(masked_device)).float()
            logits = compacted(images.to(compacted_device)).float().to(reference.device)
            labels = labels.to(reference.device)
            max_diff = torch.maximum(max_diff, (reference - logits).abs().max().double().cpu())
            scale = torch.maximum(scale, reference.abs().max().double().cpu())
            predicted_masked, predicted = reference.argmax(1), logits.argmax(1)
            agree += int((predicted_masked == predicted).sum())
            correct_masked += int((predicted_masked == labels).sum())
            correct += int((predicted == labels).sum())
            images_seen += len(labels)
            input_shape = tuple(images.shape[1:])
    if not images_seen:
        raise ConfigError("verification got no test images; the test dataloader is empty")
    return Verification(
        max_abs_diff=float(max_diff),
        agreement=agree / images_seen,
        acc_masked=correct_masked / images_seen,
        acc=correct / images_seen,
        images=images_seen,
        input_shape=input_shape,
        logit_scale=float(scale),
    )
