"""Which channels are pruned, when, and the errors for selections that cannot work."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from test_strategies import TinyNet, toy_loader
from torch import nn

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, find_prunable_layers, trace_channel_graph
from pruneflow.models import ResNet
from pruneflow.pruning.criteria import (
    L1,
    L2,
    BnGamma,
    Criterion,
    Random,
    Taylor,
    channels_to_prune,
    select_channels,
    taylor_contribution,
)
from pruneflow.pruning.sparsity_schedule import PruningSchedule


def fit(module: L.LightningModule, pruning: ChannelPruning, epochs: int = 1) -> None:
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=toy_loader())


def tiny_module(activation: str = "relu") -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(TinyNet(activation), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), num_classes=3)


def test_l1_selects_the_smallest_kernels() -> None:
    model = TinyNet("relu")
    with torch.no_grad():
        for channel, scale in enumerate([5.0, 0.1, 3.0, 0.2, 4.0, 0.3]):
            model.features[0].weight[channel] = scale
    space = find_prunable_layers(model)[0].space
    scores = L1().scores(space)
    pruned = select_channels(scores, channels_to_prune(6, 0.5), torch.zeros(6, dtype=torch.bool))
    assert pruned.nonzero().flatten().tolist() == [1, 3, 5]


def lowest_three(criterion: Criterion, model: nn.Module) -> list[int]:
    space = find_prunable_layers(model)[0].space
    return select_channels(criterion.scores(space), 3, torch.zeros(6, dtype=torch.bool)).nonzero().flatten().tolist()


def test_l1_l2_and_taylor_each_choose_the_channels_their_own_measure_ranks_lowest() -> None:
    model = TinyNet("relu")
    conv = model.features[0]  # 6 channels of 1x3x3 kernels
    with torch.no_grad():
        conv.weight.zero_()
        for channel in (0, 2, 4):  # one large weight: L1 = L2 = 3
            conv.weight[channel, 0, 0, 0] = 3.0
        for channel in (1, 3, 5):  # nine spread weights: L1 = 4.5 but L2 = 1.5
            conv.weight[channel].fill_(0.5)
    assert lowest_three(L1(), model) == [0, 2, 4]
    assert lowest_three(L2(), model) == [1, 3, 5]

    # Taylor: |Σ w·∂L/∂w| per channel = 0.03, 4.5, 0.06, 4.5, 0.3, 0.9. Without the absolute value channel 3
    # (−4.5) would go; by the gradient alone channel 4 (large gradient where its weight is 0) would stay.
    grad = torch.zeros_like(conv.weight)
    grad[0, 0, 0, 0], grad[2, 0, 0, 0], grad[4, 0, 0, 0] = -0.01, 0.02, 0.1
    grad[4, 0, 1:] = 5.0
    grad[1], grad[3], grad[5] = 1.0, -1.0, 0.2
    conv.weight.grad = grad
    layer = find_prunable_layers(model)[0]
    contribution = taylor_contribution(layer)
    assert contribution is not None
    torch.testing.assert_close(contribution, torch.tensor([-0.03, 4.5, 0.06, -4.5, 0.3, 0.9]))
    taylor = Taylor(batches=1)
    assert not taylor.ready()  # starts gathering
    taylor.before_optimizer_step([layer])
    assert taylor.ready()
    assert lowest_three(taylor, model) == [0, 2, 4]


def test_taylor_sums_every_gathered_batch_before_scoring() -> None:
    model = TinyNet("relu")
    layer = find_prunable_layers(model)[0]
    conv = layer.producer  # 6 channels of 1x3x3 kernels
    with torch.no_grad():
        conv.weight.fill_(1.0)
    taylor = Taylor(batches=2)
    assert not taylor.ready()  # starts gathering
    # Σ w·∂L/∂w per channel: 9·g. The sum ranks channels 3, 4, 5 lowest; the last batch alone 0, 1, 2.
    for per_channel in ([5.0, 5.0, 5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]):
        conv.weight.grad = torch.tensor(per_channel).view(6, 1, 1, 1).expand_as(conv.weight).clone()
        taylor.before_optimizer_step([layer])
    assert taylor.ready()
    torch.testing.assert_close(taylor.scores(layer.space), torch.tensor([45.0, 45.0, 45.0, 9.0, 9.0, 9.0]))
    assert lowest_three(taylor, model) == [3, 4, 5]


def test_bn_gamma_and_random_criteria() -> None:
    model = TinyNet("relu")
    with torch.no_grad():
        model.features[1].weight.copy_(torch.tensor([1.0, -0.01, 2.0, 0.5, -3.0, 0.02]))
    space = find_prunable_layers(model)[0].space
    gamma = BnGamma().scores(space)
    assert select_channels(gamma, 2, torch.zeros(6, dtype=torch.bool)).nonzero().flatten().tolist() == [1, 5]
    first = Random(seed=3).scores(space)
    assert torch.equal(first, Random(seed=3).scores(space))
    assert not torch.equal(first, Random(seed=4).scores(space))


def coupled_group(model: nn.Module) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if "layer1.0.conv2" in space.names)


def test_a_group_is_scored_by_all_its_producers_together() -> None:
    model = ResNet(depth=8, width=4)  # stem conv1 and layer1.0.conv2 write one space
    group = coupled_group(model)
    assert group.names == ["conv1", "layer1.0.conv2"]
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor([1.0, 9.0, 1.0, 9.0]).view(4, 1, 1, 1))
        model.layer1[0].conv2.weight.copy_(torch.tensor([1.0, 1.0, 9.0, 9.0]).view(4, 1, 1, 1))
        model.bn1.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model.layer1[0].bn2.weight.copy_(torch.tensor([4.0, -1.0, 0.5, 0.0]))
    # channel 0 is small in both producers, channel 3 large in both; 1 and 2 large in one only.
    # conv1 reads 3 input channels (27 weights per kernel), layer1.0.conv2 reads 4 (36 weights).
    assert L1().scores(group).tolist() == [27 + 36, 27 * 9 + 36, 27 + 36 * 9, 63 * 9]
    squares = [27 + 36, 27 * 81 + 36, 27 + 36 * 81, 63 * 81]
    assert L2().scores(group).tolist() == pytest.approx([value**0.5 for value in squares])
    assert BnGamma().scores(group).tolist() == [5.0, 3.0, 3.5, 4.0]


def test_a_coupled_group_is_masked_identically_at_every_producer() -> None:
    torch.manual_seed(0)
    module = ClassifierModule(ResNet(input_shape=(1, 8, 8), num_classes=3, depth=8, width=4),
                              lambda p: torch.optim.SGD(p, lr=0.05), num_classes=3)  # fmt: skip
    pruning = ChannelPruning("activation", layers=["layer1.0.conv2"], groups=True, at_step=1, log_every_n_steps=1)
    fit(module, pruning)
    assert [layer.name for layer in pruning.layers] == ["conv1", "layer1.0.conv2"]
    # Measured from outside the masks: the channels each channel point (bn1, layer1.0.bn2) outputs as zero.
    outputs: dict[str, torch.Tensor] = {}
    network = module.model
    for name in ("bn1", "layer1.0.bn2"):
        network.get_submodule(name).register_forward_hook(
            lambda _, __, output, name=name: outputs.__setitem__(name, output.detach())
        )
    network.train()
    with torch.no_grad():
        network(torch.randn(16, 1, 8, 8))
    dead = {name: (output.abs().amax((0, 2, 3)) == 0) for name, output in outputs.items()}
    assert int(dead["bn1"].sum()) == 2
    assert torch.equal(dead["bn1"], dead["layer1.0.bn2"])
    assert torch.equal(dead["bn1"], pruning.pruned["conv1"].cpu())
    final = pruning.final_metrics()
    assert final["drift/producer_l2/max"] == 0.0 and final["leak/activation_abs_mean/final"] == 0.0


def test_explicit_lists_that_together_empty_a_coupled_group_are_rejected_before_training() -> None:
    torch.manual_seed(0)
    module = ClassifierModule(ResNet(input_shape=(1, 8, 8), num_classes=3, depth=8, width=4),
                              lambda p: torch.optim.SGD(p, lr=0.05), num_classes=3)  # fmt: skip
    # Each list leaves channels of its own producer, but conv1 and layer1.0.conv2 write one 4-channel space.
    channels = {"conv1": [0, 1], "layer1.0.conv2": [2, 3]}
    pruning = ChannelPruning("activation", criterion="explicit", channels=channels, groups=True, at_step=10_000)
    with pytest.raises(ConfigError, match=r"together remove all 4 channels of the group conv1\+layer1\.0\.conv2"):
        fit(module, pruning)


def test_amount_never_removes_a_whole_layer_and_keeps_earlier_choices() -> None:
    assert channels_to_prune(3, 0.5) == 1
    assert channels_to_prune(2, 0.99) == 1
    assert channels_to_prune(1, 0.9) == 0
    already = torch.tensor([False, False, True, False])
    assert select_channels(torch.tensor([0.0, 1.0, 9.0, 2.0]), 2, already).tolist() == [True, False, True, False]


def test_explicit_channels_are_pruned_at_the_given_step() -> None:
    pruning = ChannelPruning("activation", criterion="explicit", channels={"features.3": [1, 6]}, at_step=3)
    fit(tiny_module(), pruning)
    assert list(pruning.pruned) == ["features.3"]
    assert pruning.pruned["features.3"].nonzero().flatten().tolist() == [1, 6]
    assert pruning.final_metrics()["mask/pruning_steps"] == [3]


def test_taylor_gathers_gradients_for_its_batches_then_prunes() -> None:
    pruning = ChannelPruning("activation", criterion="taylor", taylor_batches=3, at_step=2, log_every_n_steps=1)
    fit(tiny_module(), pruning)
    assert pruning.final_metrics()["mask/pruning_steps"] == [5]
    assert {name: int(mask.sum()) for name, mask in pruning.pruned.items()} == {"features.0": 3, "features.3": 4}


def test_gradual_schedule_follows_the_cubic_ramp() -> None:
    schedule = PruningSchedule(0.8, "gradual", start_epoch=1, end_epoch=3)
    targets = [schedule.target(epoch, 0) for epoch in range(5)]
    assert targets == pytest.approx([0.0, 0.0, 0.8 * (1 - 0.5**3), 0.8, 0.8])
    pruning = ChannelPruning("activation", amount=0.8, schedule="gradual", start_epoch=0, end_epoch=2)
    fit(tiny_module(), pruning, epochs=3)
    assert len(pruning.pruning_steps) == 2  # epoch 0 targets 0: nothing; epochs 1 and 2 prune more
    assert int(pruning.pruned["features.3"].sum()) == channels_to_prune(8, 0.8)


class BareModule(L.LightningModule):
    """Not a ClassifierModule, and no ``model`` attribute: the callback prunes the module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyNet("silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_works_on_any_lightning_module() -> None:
    pruning = ChannelPruning("activation", at_step=4, reset_optimizer_state=True, log_every_n_steps=1)
    fit(BareModule(), pruning)
    assert [layer.name for layer in pruning.layers] == ["body.features.0", "body.features.3"]
    assert pruning.final_metrics()["drift/producer_l2/max"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "prune_harder"}, "unknown mask strategy 'prune_harder'; choose one of: control, weight, "),
        ({"criterion": "magnitude"}, "unknown mask.criterion 'magnitude'; choose one of: l1, l2, random"),
        ({"amount": 1.0}, r"mask.amount must be a fraction in \[0, 1\), got 1.0"),
        ({"amount": -0.1}, r"mask.amount must be a fraction in \[0, 1\), got -0.1"),
        ({"criterion": "explicit"}, "mask.criterion=explicit needs mask.channels"),
        ({"at_epoch": 1, "at_step": 3}, "set mask.at_epoch or mask.at_step, not both"),
        ({"schedule": "gradual", "start_epoch": 2, "end_epoch": 2}, "needs 0 <= mask.start_epoch < mask.end_epoch"),
        ({"log_every_n_steps": 0}, "mask.log_every_n_steps must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_rejected_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelPruning(**kwargs)


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ({"features.3": [2, 8]}, r"mask.channels\[features.3\] has indices \[8\] outside 0..7"),
        ({"features.0": [0, 1, 2, 3, 4, 5]}, r"would remove all 6 channels; keep at least one"),
        ({"classifier.1": [0]}, "mask.layers pattern 'classifier.1' selects classifier.1, which cannot be pruned"),
    ],
)
def test_bad_explicit_channels_are_rejected_before_training(channels: dict, message: str) -> None:
    pruning = ChannelPruning("activation", criterion="explicit", channels=channels)
    with pytest.raises(ValueError, match=message):
        fit(tiny_module(), pruning)


def test_bn_gamma_on_a_layer_without_batchnorm_is_rejected() -> None:
    class NoNorm(TinyNet):
        def __init__(self) -> None:
            super().__init__("relu")
            self.features[1] = nn.Identity()

    module = ClassifierModule(NoNorm(), lambda p: torch.optim.SGD(p, lr=0.1), num_classes=3)
    with pytest.raises(ValueError, match=r"bn_gamma needs an affine BatchNorm after features\.0"):
        fit(module, ChannelPruning("activation", criterion="bn_gamma"))


class NoForwardModule(L.LightningModule):
    """No ``forward``: only ``training_step`` calls the network it holds, so the module cannot be traced."""

    def __init__(self, second: bool = False) -> None:
        super().__init__()
        self.body = TinyNet("relu")
        self.teacher = nn.Linear(2, 2) if second else None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self.body(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_module_without_forward_prunes_the_network_it_holds_or_says_how_to_point_at_it(caplog) -> None:
    pruning = ChannelPruning("activation", at_step=1)
    with caplog.at_level(logging.INFO, logger="pruneflow.pruning.pruned_network"):
        fit(NoForwardModule(), pruning)
    assert "NoForwardModule defines no forward: pruning the network it holds, body" in caplog.text
    assert [layer.name for layer in pruning.layers] == ["features.0", "features.3"]
    with pytest.raises(ConfigError, match=r"defines no forward.* with module=<attribute> .*: body, teacher\)"):
        fit(NoForwardModule(second=True), ChannelPruning("activation", at_step=1))


class TaylorWitness(L.Callback):
    """features.0's Σ w·∂L/∂w per channel with the optimizer step's whole (accumulated) gradient."""

    def __init__(self) -> None:
        self.contributions: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        conv = pl_module.model.features[0]
        self.contributions[trainer.global_step] = (conv.weight.detach() * conv.weight.grad).flatten(1).sum(1)


def test_taylor_counts_optimizer_steps_and_reads_each_whole_gradient_once_under_accumulation() -> None:
    pruning = ChannelPruning("activation", criterion="taylor", taylor_batches=3, at_step=2, log_every_n_steps=1)
    witness = TaylorWitness()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning, witness], logger=False, enable_checkpointing=False,
        accumulate_grad_batches=2, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(tiny_module(), train_dataloaders=toy_loader())
    assert pruning.pruning_steps == [5]  # gathered over the optimizer steps taken at 2, 3 and 4
    gathered = sum(witness.contributions[step] for step in (2, 3, 4))
    torch.testing.assert_close(pruning.criterion.sums["features.0"], gathered)
