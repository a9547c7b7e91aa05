"""Each masking strategy's invariant on a small conv → BN → act network, pruned after some training.

Which quantities are exactly zero after pruning and which are not, under SGD with momentum and Adam,
with ReLU and SiLU. Pruning happens after pre-training steps, so β ≠ 0 and optimizer state is warm.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.models import make_activation

PRUNE_AT = 6
STEPS = 16


class TinyNet(nn.Module):
    def __init__(self, activation: str) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), make_activation(activation),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), make_activation(activation),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def toy_loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(STEPS * 16, 1, 8, 8, generator=generator)
    labels = (images.mean((1, 2, 3)) > 0).long() + (images[:, 0, 0, 0] > 1).long()
    return DataLoader(TensorDataset(images, labels), batch_size=16)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


def run(
    strategy: str, optimizer: str = "sgd", activation: str = "relu", **mask_kwargs
) -> tuple[ChannelPruning, nn.Module]:
    torch.manual_seed(0)
    model = TinyNet(activation)
    module = ClassifierModule(model, OPTIMIZERS[optimizer], num_classes=3)
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=PRUNE_AT, log_every_n_steps=1, **mask_kwargs)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())
    return pruning, model


def final(pruning: ChannelPruning, tag: str) -> float:
    return pruning.final_metrics()[f"{tag}/final"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_activation_mask_with_state_reset_keeps_kernels_exactly_zero(optimizer: str, activation: str) -> None:
    pruning, _ = run("activation", optimizer, activation, reset_optimizer_state=True)
    metrics = pruning.final_metrics()
    assert metrics["drift/producer_l2/max"] == 0.0
    assert metrics["drift/zero_fraction/final"] == 1.0
    assert metrics["grad/pruned_l2/max"] == 0.0
    assert metrics["leak/activation_abs_mean/max"] == 0.0
    for layer in pruning.layers:
        assert torch.all(layer.conv.weight[pruning.pruned[layer.name]] == 0)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_activation_mask_without_reset_drifts_under_momentum_but_never_leaks(activation: str) -> None:
    pruning, _ = run("activation", "sgd", activation)
    assert final(pruning, "grad/pruned_l2") == 0.0  # the mask kills the gradient exactly...
    assert pruning.final_metrics()["drift/producer_l2/max"] > 0.0  # ...but momentum keeps moving the kernel
    assert pruning.final_metrics()["leak/activation_abs_mean/max"] == 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_weight_mask_kernels_get_gradient_and_drift(optimizer: str, activation: str) -> None:
    pruning, _ = run("weight", optimizer, activation)
    metrics = pruning.final_metrics()
    assert metrics["grad/pruned_l2/max"] > 0.0
    assert metrics["drift/producer_l2/final"] > 0.0
    assert metrics["drift/zero_fraction/final"] < 1.0
    assert metrics["leak/activation_abs_mean/max"] > 0.0


def test_weight_mask_drifts_even_with_optimizer_state_reset() -> None:
    pruning, _ = run("weight", "sgd", "silu", reset_optimizer_state=True)
    assert final(pruning, "drift/producer_l2") > 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_mask_is_undone_by_momentum_and_leaks_beta(optimizer: str) -> None:
    pruning, _ = run("gradient", optimizer, "silu")
    metrics = pruning.final_metrics()
    assert metrics["grad/pruned_l2/max"] > 0.0  # measured before the mask: the seed effect
    assert metrics["drift/producer_l2/final"] > 0.0  # state gathered before pruning moves the kernel
    assert metrics["leak/activation_abs_mean/max"] > 0.0  # BatchNorm outputs β for the zero channel


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_mask_with_state_reset_holds_kernels_but_channel_still_leaks(optimizer: str) -> None:
    pruning, _ = run("gradient", optimizer, "silu", reset_optimizer_state=True)
    metrics = pruning.final_metrics()
    assert metrics["drift/producer_l2/max"] == 0.0
    assert metrics["leak/activation_abs_mean/final"] > 0.0
    assert metrics["bn/beta_abs/final"] > 0.0


def test_hard_mask_is_zero_when_measured_but_gradient_flows() -> None:
    pruning, _ = run("hard", "sgd", "silu")
    metrics = pruning.final_metrics()
    assert metrics["drift/producer_l2/max"] == 0.0
    assert metrics["grad/pruned_l2/max"] > 0.0
    assert metrics["leak/activation_abs_mean/max"] > 0.0


def test_parametrize_effective_weight_zero_while_stored_weight_drifts() -> None:
    pruning, model = run("parametrize", "sgd", "silu")
    metrics = pruning.final_metrics()
    assert metrics["drift/producer_l2/max"] == 0.0
    assert metrics["drift/stored_l2/final"] > 0.0
    assert metrics["leak/activation_abs_mean/final"] > 0.0
    conv = model.features[0]
    mask = pruning.pruned["features.0"]
    assert torch.all(conv.weight[mask] == 0)
    assert conv.parametrizations.weight.original[mask].abs().sum() > 0


def test_adamw_decoupled_decay_shrinks_stored_weights_that_get_no_gradient() -> None:
    # parametrize masks the stored weight's gradient and the reset empties Adam's moments, so the only
    # force left on the stored kernel is AdamW's decay: w ← w·(1 − lr·wd) each step.
    pruning, _ = run("parametrize", "adamw", "relu", reset_optimizer_state=True)
    stored = pruning.history["drift/stored_l2"]
    assert pruning.final_metrics()["grad/pruned_l2/max"] == 0.0
    assert all(later < earlier for earlier, later in itertools.pairwise(stored))
    assert stored[-1] / stored[0] == pytest.approx((1 - 1e-2 * 1e-2) ** (len(stored) - 1), rel=1e-4)


def test_none_strategy_measures_would_be_pruned_channels_without_touching_them() -> None:
    pruning, _ = run("none", "sgd", "relu")
    metrics = pruning.final_metrics()
    assert metrics["drift/zero_fraction/final"] == 0.0
    assert metrics["drift/producer_l2/final"] > 0.0
    assert metrics["mask/pruning_steps"] == [PRUNE_AT]


def test_consumer_drift_is_measured_for_conv_and_linear_consumers() -> None:
    pruning, _ = run("weight", "sgd", "relu")
    names = {c.name for layer in pruning.layers for c in layer.consumers}
    assert names == {"features.3", "classifier.1"}
    assert final(pruning, "drift/consumer_l2") > 0.0


def test_masks_restored_from_a_checkpoint_state_are_measured_like_fresh_ones() -> None:
    pruning, model = run("hard")
    leak = final(pruning, "leak/activation_abs_mean")
    assert leak > 0.01  # hard re-zeroes kernels, the BatchNorm still emits β
    fresh = TinyNet("relu")
    fresh.load_state_dict(model.state_dict())
    restored = ChannelPruning(strategy="hard", amount=0.5, at_step=PRUNE_AT, log_every_n_steps=1)
    restored.load_state_dict(pruning.state_dict())  # as a resumed run does, before setup
    trainer = L.Trainer(
        max_steps=2, callbacks=[restored], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(ClassifierModule(fresh, OPTIMIZERS["sgd"], num_classes=3), train_dataloaders=toy_loader(seed=1))
    assert restored.pruned.keys() == pruning.pruned.keys()
    assert final(restored, "leak/activation_abs_mean") == pytest.approx(leak, rel=0.5)


def fit_steps(pruning: ChannelPruning, model: nn.Module, steps: int = 2) -> None:
    trainer = L.Trainer(
        max_steps=steps, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(ClassifierModule(model, OPTIMIZERS["sgd"], num_classes=3), train_dataloaders=toy_loader())


def test_static_masks_install_before_pruning_and_a_mismatched_resume_is_refused_in_one_line() -> None:
    torch.manual_seed(0)
    model = TinyNet("relu")
    prepared = ChannelPruning(strategy="parametrize", at_step=1000, static_masks=True)  # prunes after the run
    fit_steps(prepared, model)
    # Prepared as for a compiled network: parametrized from setup on, with nothing pruned yet.
    assert "features.0.parametrizations.weight.original" in model.state_dict()
    assert not prepared.pruned and prepared.state_dict()["masks_prepared"] is True
    eager = ChannelPruning(strategy="parametrize", at_step=1000)
    eager.load_state_dict(prepared.state_dict())
    with pytest.raises(ValueError, match=r"^the checkpoint was written with compile=true .* resume with compile=true$"):
        fit_steps(eager, TinyNet("relu"))
    # Once every layer is pruned, both name their weights alike: nothing to refuse.
    pruned_state = run("parametrize")[0].state_dict() | {"masks_prepared": True}
    resumed = ChannelPruning(strategy="parametrize", amount=0.5, at_step=PRUNE_AT)
    resumed.load_state_dict(pruned_state)
    fit_steps(resumed, TinyNet("relu"))
    assert resumed.pruned.keys() == pruned_state["pruned"].keys()
