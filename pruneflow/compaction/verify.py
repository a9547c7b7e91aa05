"""Verification: does the compacted model compute what the masked model computed? Logits compared on a test set.

The masked model is the network as trained, in eval mode, with its strategy's masks in effect (an
``activation`` mask's hooks, a ``parametrize`` mask's parametrization). Where every cut channel was
dead the two agree to float rounding; where pruned channels were alive (``weight``, ``control``, or β
leaking under ``gradient``/``hard``/``parametrize``) the accuracy gap is the honest price of the cut.

Float rounding is not always small at the logits. The cut network sums fewer terms in another order, so its
activations differ from the masked network's by about one float32 ulp; a network that amplifies small
differences (an untrained deep network in eval mode, whose BatchNorms' running statistics normalise nothing:
random-weight timm ``efficientnetv2_s`` turns a relative input change of 1e-6 into 30 % of its logits) carries
that ulp to the output. So a comparison that is not exact in the network's own precision is repeated in
float64, on copies of both models: a cut that removed only dead channels then agrees to ~1e-16 × the same
amplification, while a wrong cut differs as much as before. The verdict and the agreement come from that
repetition; the float32 figures are kept beside them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

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


def randomize_zero_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Random weights (normal, ``std``) in every conv or linear layer whose weight is all zero: torchvision's ViT
    builds its head at zero, so every logit is its bias and a compacted network would agree with its masked original
    whatever the cut did; random weights make a difference show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    return model


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
    # Set where the comparison was repeated in float64 (see the module docstring): the first comparison's
    # max |Δ logit| over the logits' scale, and its top-1 agreement.
    working_precision_rel_diff: float | None = None
    working_precision_agreement: float | None = None

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

    @property
    def rounding_amplified(self) -> bool:
        """Whether the models differed in their own precision only by amplified rounding (exact in float64)."""
        return self.working_precision_rel_diff is not None and self.exact

    def metrics(self) -> dict[str, Any]:
        figures = {
            "compact/max_abs_diff": self.max_abs_diff,
            "compact/max_rel_diff": self.max_rel_diff,
            "compact/agreement": self.agreement,
            "compact/acc_masked": self.acc_masked,
            "compact/acc": self.acc,
            "compact/acc_gap": self.acc_gap,
            "compact/test_images": self.images,
        }
        if self.working_precision_rel_diff is not None:
            figures["compact/compared_in_float64"] = 1.0
            figures["compact/max_rel_diff_working_precision"] = self.working_precision_rel_diff
            figures["compact/agreement_working_precision"] = self.working_precision_agreement
        return figures


def verify(masked: nn.Module, compacted: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> Verification:
    """Run both models in eval mode over ``(images, labels)`` batches (already normalised) and compare.

    ``max_abs_diff`` is the largest |Δ logit| over all images and classes (``max_rel_diff`` that over the
    largest |logit| of the masked model, at least 1), ``agreement`` the share of
    images whose top-1 class is the same; each model's accuracy is measured against the labels. A comparison
    that is not exact is repeated in float64 (the module docstring says why); the accuracies stay those of
    the models as they run.
    """
    batches = list(batches)
    checked = _compare(masked, compacted, batches)
    if checked.exact:
        return checked
    repeated = _compare_in_float64(masked, compacted, batches)
    return checked if repeated is None else judged_in_float64(checked, repeated)


def judged_in_float64(working: Verification, repeated: Verification) -> Verification:
    """``repeated``'s verdict and agreement (the float64 comparison), ``working``'s accuracies, and
    ``working``'s own difference and agreement kept beside them."""
    return Verification(
        max_abs_diff=repeated.max_abs_diff,
        agreement=repeated.agreement,
        acc_masked=working.acc_masked,
        acc=working.acc,
        images=working.images,
        input_shape=working.input_shape,
        logit_scale=repeated.logit_scale,
        working_precision_rel_diff=working.max_rel_diff,
        working_precision_agreement=working.agreement,
    )


def _compare_in_float64(
    masked: nn.Module, compacted: nn.Module, batches: list[tuple[Tensor, Tensor]]
) -> Verification | None:
    """``_compare`` on float64 copies of both models (on the CPU: not every accelerator has float64), or
    None where a model cannot be copied or run in float64 (a compiled or quantised model, say)."""
    try:
        masked64 = copy.deepcopy(masked).to("cpu", torch.float64)
        compacted64 = copy.deepcopy(compacted).to("cpu", torch.float64)
        batches64 = [(images.to("cpu", torch.float64), labels.cpu()) for images, labels in batches]
        return _compare(masked64, compacted64, batches64)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        log.info("verification: no float64 comparison for this model (%s)", str(error).splitlines()[0])
        return None


@torch.inference_mode()
def _compare(
    masked: nn.Module, compacted: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]
) -> Verification:
    masked_device, compacted_device = device_of(masked), device_of(compacted)
    max_diff = torch.zeros((), dtype=torch.float64)
    scale = torch.zeros((), dtype=torch.float64)
    agree = correct_masked = correct = images_seen = 0
    input_shape: tuple[int, ...] = ()
    with evaluating(masked, compacted):
        for images, labels in batches:
            reference = masked(images.to(masked_device)).double()
            logits = compacted(images.to(compacted_device)).double().to(reference.device)
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
