"""Each masking strategy's invariant on a small conv → BN → act network, pruned after some training.

Which quantities are exactly zero after pruning and which are not, under SGD with momentum and Adam,
with ReLU and SiLU. Pruning happens after pre-training steps, so β ≠ 0 and optimizer state is warm.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PROBE_TAG, ConsumerInputProbe
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.graph import PrunableLayer
from pruneflow.models import make_activation
from pruneflow.pruning.strategies import KEEP_BUFFER

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


@dataclass
class Run:
    pruning: ChannelPruning
    model: nn.Module
    probe: ConsumerInputProbe
    trainer: L.Trainer

    def __iter__(self):  # unpacks and indexes as (pruning, model)
        return iter((self.pruning, self.model))

    def __getitem__(self, index: int):
        return (self.pruning, self.model)[index]

    def received(self) -> float:
        """The largest |value| a consumer received on a pruned channel (measured outside the mask)."""
        assert self.probe.forwards_after_pruning == STEPS - PRUNE_AT, "the probe did not see the pruned steps"
        return self.probe.final_metrics()[PROBE_TAG]


def run(
    strategy: str,
    optimizer: str = "sgd",
    activation: str = "relu",
    callbacks: tuple[L.Callback, ...] = (),
    **mask_kwargs,
) -> Run:
    torch.manual_seed(0)
    model = TinyNet(activation)
    module = ClassifierModule(model, OPTIMIZERS[optimizer], num_classes=3)
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=PRUNE_AT, log_every_n_steps=1, **mask_kwargs)
    probe = ConsumerInputProbe()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, probe, *callbacks], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())
    return Run(pruning, model, probe, trainer)


def final(pruning: ChannelPruning, tag: str) -> float:
    return pruning.final_metrics()[f"{tag}/final"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_activation_mask_with_state_reset_keeps_kernels_exactly_zero(optimizer: str, activation: str) -> None:
    result = run("activation", optimizer, activation, reset_optimizer_state=True)
    pruning = result.pruning
    metrics = pruning.final_metrics()
    assert metrics["drift/producer_l2/max"] == 0.0
    assert metrics["drift/zero_fraction/final"] == 1.0
    assert metrics["grad/pruned_l2/max"] == 0.0
    assert metrics["leak/activation_abs_mean/max"] == 0.0
    assert result.received() == 0.0  # what the next conv and the linear layer actually read
    for layer in pruning.layers:
        assert torch.all(layer.producer.weight[pruning.pruned[layer.name]] == 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_state_reset_zeroes_the_pruned_rows_of_every_optimizer_state_tensor(optimizer: str) -> None:
    result = run("activation", optimizer, "silu", reset_optimizer_state=True)
    (torch_optimizer,) = result.trainer.optimizers
    expected = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"}, "adamw": {"exp_avg", "exp_avg_sq"}}
    for layer in result.pruning.layers:
        pruned = result.pruning.pruned[layer.name]
        state = torch_optimizer.state[layer.producer.weight]
        rows = {key: value for key, value in state.items() if torch.is_tensor(value) and value.ndim == 4}
        assert set(rows) == expected[optimizer], layer.name
        for key, value in rows.items():
            assert torch.all(value[pruned] == 0), f"{layer.name} {key}: pruned rows not reset"
            assert torch.all(value[~pruned].abs().sum((1, 2, 3)) > 0), f"{layer.name} {key}: kept rows were touched"


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_activation_mask_without_reset_drifts_under_momentum_but_never_leaks(activation: str) -> None:
    result = run("activation", "sgd", activation)
    pruning = result.pruning
    assert final(pruning, "grad/pruned_l2") == 0.0  # the mask kills the gradient exactly...
    assert pruning.final_metrics()["drift/producer_l2/max"] > 0.0  # ...but momentum keeps moving the kernel
    assert pruning.final_metrics()["leak/activation_abs_mean/max"] == 0.0
    assert result.received() == 0.0


def test_consumer_probe_catches_a_mask_applied_before_the_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broken on purpose: the channel point moved to the conv's output, before the BatchNorm adds β. The
    # telemetry reads the tensor the mask has just zeroed and still reports no leak and no gradient;
    # only what the consumers receive (SiLU(β) ≠ 0) shows the channel is alive.
    monkeypatch.setattr(PrunableLayer, "channel_point", property(lambda layer: layer.producer))
    result = run("activation", "sgd", "silu")
    assert final(result.pruning, "leak/activation_abs_mean") == 0.0
    assert final(result.pruning, "grad/pruned_l2") == 0.0
    assert result.received() > 0.01


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_weight_mask_kernels_get_gradient_and_drift(optimizer: str, activation: str) -> None:
    result = run("weight", optimizer, activation)
    metrics = result.pruning.final_metrics()
    assert result.received() > 0.0
    assert metrics["grad/pruned_l2/max"] > 0.0
    assert metrics["drift/producer_l2/final"] > 0.0
    assert metrics["drift/zero_fraction/final"] < 1.0
    assert metrics["leak/activation_abs_mean/max"] > 0.0


def test_weight_mask_drifts_even_with_optimizer_state_reset() -> None:
    pruning, _ = run("weight", "sgd", "silu", reset_optimizer_state=True)
    assert final(pruning, "drift/producer_l2") > 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gradient_mask_is_undone_by_momentum_and_leaks_beta(optimizer: str) -> None:
    result = run("gradient", optimizer, "silu")
    metrics = result.pruning.final_metrics()
    assert result.received() > 0.0
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
    result = run("hard", "sgd", "silu")
    metrics = result.pruning.final_metrics()
    assert result.received() > 0.0  # β reaches the consumers
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
    pruning, _ = run("control", "sgd", "relu")
    metrics = pruning.final_metrics()
    assert metrics["drift/zero_fraction/final"] == 0.0
    assert metrics["drift/producer_l2/final"] > 0.0
    assert metrics["mask/pruning_steps"] == [PRUNE_AT]


def test_consumer_drift_is_measured_for_conv_and_linear_consumers() -> None:
    pruning, _ = run("weight", "sgd", "relu")
    names = {c.name for layer in pruning.layers for c in layer.consumers}
    assert names == {"features.3", "classifier.1"}
    assert final(pruning, "drift/consumer_l2") > 0.0


def test_masks_restored_from_a_checkpoint_are_measured_like_fresh_ones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruning = ChannelPruning(strategy="hard", amount=0.5, at_step=PRUNE_AT, log_every_n_steps=1)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, ModelCheckpoint(dirpath=tmp_path, save_last=True)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(ClassifierModule(TinyNet("relu"), OPTIMIZERS["sgd"], num_classes=3), train_dataloaders=toy_loader())
    leak = final(pruning, "leak/activation_abs_mean")
    assert leak > 0.01  # hard re-zeroes kernels, the BatchNorm still emits β
    restored = ChannelPruning(strategy="hard", amount=0.5, at_step=PRUNE_AT, log_every_n_steps=1)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[restored], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    fresh = ClassifierModule(TinyNet("relu"), OPTIMIZERS["sgd"], num_classes=3)
    trainer.fit(fresh, train_dataloaders=toy_loader(seed=1), ckpt_path=tmp_path / "last.ckpt")
    assert {name: mask.tolist() for name, mask in restored.pruned.items()} == {
        name: mask.tolist() for name, mask in pruning.pruned.items()
    }
    assert restored.pruning_steps == [PRUNE_AT]  # restored, not pruned again on resuming
    assert len(restored.history["leak/activation_abs_mean"]) > len(pruning.history["leak/activation_abs_mean"])
    assert final(restored, "leak/activation_abs_mean") == pytest.approx(leak, rel=0.5)
    old, new = pruning.history["leak/activation_abs_mean"], restored.history["leak/activation_abs_mean"]
    # One more epoch measured on other data: new values, not the restored history's last one handed back.
    assert new[: len(old)] == old and len(new) == len(old) + STEPS
    assert all(value != leak for value in new[len(old) :])


class ConsumerSnapshot(L.Callback):
    """The consumers' weights at the pruning step, before its optimizer step: the consumer-drift reference."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == PRUNE_AT:
            modules = dict(pl_module.model.named_modules())
            self.weights = {name: modules[name].weight.detach().clone() for name in ("features.3", "classifier.1")}


def test_telemetry_matches_an_independent_computation_per_layer_and_aggregated() -> None:
    snapshot = ConsumerSnapshot()
    result = run("weight", "sgd", "silu", callbacks=(snapshot,))
    model, pruning = result.model, result.pruning
    bn = {"features.0": model.features[1], "features.3": model.features[4]}
    # consumer of each layer, and the input columns that read a channel c (the linear layer reads 4x4 per channel)
    consumers = {
        "features.0": ("features.3", model.features[3], 1),
        "features.3": ("classifier.1", model.classifier[1], 16),
    }
    expected: dict[str, float] = {}
    sums = {"producer_sq": 0.0, "consumer_sq": 0.0, "beta": 0.0, "gamma": 0.0, "channels": 0, "max_abs": 0.0}
    for name, conv in (("features.0", model.features[0]), ("features.3", model.features[3])):
        pruned = pruning.pruned[name].nonzero().flatten().tolist()
        kernels = conv.weight.detach()[pruned]
        consumer_name, consumer, k = consumers[name]
        columns = [c * k + j for c in pruned for j in range(k)]
        moved = consumer.weight.detach()[:, columns] - snapshot.weights[consumer_name][:, columns]
        expected[f"drift/producer_l2/{name}"] = kernels.norm().item()
        expected[f"drift/producer_max_abs/{name}"] = kernels.abs().max().item()
        expected[f"drift/consumer_l2/{name}"] = moved.norm().item()
        expected[f"bn/beta_abs/{name}"] = bn[name].bias.detach()[pruned].abs().mean().item()
        expected[f"bn/gamma_abs/{name}"] = bn[name].weight.detach()[pruned].abs().mean().item()
        sums["producer_sq"] += kernels.norm().item() ** 2
        sums["consumer_sq"] += moved.norm().item() ** 2
        sums["max_abs"] = max(sums["max_abs"], kernels.abs().max().item())
        sums["beta"] += bn[name].bias.detach()[pruned].abs().sum().item()
        sums["gamma"] += bn[name].weight.detach()[pruned].abs().sum().item()
        sums["channels"] += len(pruned)
    expected["drift/producer_l2"] = math.sqrt(sums["producer_sq"])
    expected["drift/producer_max_abs"] = sums["max_abs"]
    expected["drift/consumer_l2"] = math.sqrt(sums["consumer_sq"])
    expected["bn/beta_abs"] = sums["beta"] / sums["channels"]  # a mean over channels, not over layers
    expected["bn/gamma_abs"] = sums["gamma"] / sums["channels"]
    assert sums["channels"] == 3 + 4 and all(value > 0 for value in expected.values())
    measured = {tag: pruning.history[tag][-1] for tag in expected}
    assert measured == pytest.approx(expected, rel=1e-5)


def test_plain_validate_with_a_parametrize_checkpoint_evaluates_the_masked_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruning = ChannelPruning(strategy="parametrize", amount=0.5, at_step=PRUNE_AT)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, ModelCheckpoint(dirpath=tmp_path, save_last=True)], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trained = ClassifierModule(TinyNet("relu"), OPTIMIZERS["sgd"], num_classes=3)
    trainer.fit(trained, train_dataloaders=toy_loader())
    expected = trainer.validate(trained, dataloaders=toy_loader(seed=1), verbose=False)
    restored = ChannelPruning(strategy="parametrize", amount=0.5, at_step=PRUNE_AT)
    trainer = L.Trainer(
        callbacks=[restored], logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    fresh = ClassifierModule(TinyNet("relu"), OPTIMIZERS["sgd"], num_classes=3)
    result = trainer.validate(fresh, dataloaders=toy_loader(seed=1), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert result == expected
    assert restored.pruned.keys() == pruning.pruned.keys()
    for layer in restored.layers:
        assert bool((layer.producer.weight[restored.pruned[layer.name]] == 0).all())  # the effective weight


def fit_steps(pruning: ChannelPruning, model: nn.Module, steps: int = 2) -> None:
    trainer = L.Trainer(
        max_steps=steps, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(ClassifierModule(model, OPTIMIZERS["sgd"], num_classes=3), train_dataloaders=toy_loader())


@pytest.mark.parametrize("strategy", ["parametrize", "activation"])
def test_forward_masks_are_installed_at_setup_so_names_do_not_change_when_pruning(strategy: str) -> None:
    torch.manual_seed(0)
    model = TinyNet("relu")
    not_yet = ChannelPruning(strategy=strategy, at_step=1000)  # prunes after the run
    fit_steps(not_yet, model)
    assert not not_yet.pruned
    # Nothing pruned yet, yet the parameter and buffer names are those of a pruned network.
    assert model.state_dict().keys() == run(strategy)[1].state_dict().keys()
    if strategy == "parametrize":
        assert "features.0.parametrizations.weight.original" in model.state_dict()
    else:
        assert all(bool((getattr(layer.channel_point, KEEP_BUFFER) == 1).all()) for layer in not_yet.layers)


def test_static_masks_is_accepted_with_a_future_warning_and_state_needs_setup() -> None:
    with pytest.warns(FutureWarning, match=r"^mask.static_masks=True is ignored and will be removed"):
        pruning = ChannelPruning(strategy="parametrize", static_masks=True)
    with pytest.raises(RuntimeError, match=r"restore a checkpoint through Trainer.fit/validate/test\(ckpt_path=...\)"):
        pruning.load_state_dict(run("parametrize")[0].state_dict())
