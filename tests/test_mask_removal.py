"""``MaskStrategy.remove`` and ``DriftTelemetry.remove``: after them the network is plain again and keeps its
effective weights (``torch.nn.utils.prune.remove``'s promise: a parametrize mask's zeros made permanent)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.pruning.strategies import STRATEGIES


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def hooks(network: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_remove_leaves_a_plain_network_with_the_effective_weights(strategy: str) -> None:
    torch.manual_seed(0)
    network = tiny_net()
    plain_keys = set(network.state_dict())
    module = ClassifierModule(network, lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9), num_classes=3)
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=2, log_every_n_steps=1)
    images = torch.randn(64, 1, 8, 8)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 3, (64,))), batch_size=16)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    assert hooks(network) > 0  # the telemetry's (and the activation mask's) hooks are in place
    effective = {layer.name: layer.producer.weight.detach().clone() for layer in pruning.layers}

    for layer in pruning.layers:
        pruning.strategy.remove(layer)
    assert pruning.telemetry is not None
    pruning.telemetry.remove()

    assert hooks(network) == 0
    assert set(network.state_dict()) == plain_keys
    assert not any(name.startswith("pruneflow_") for m in network.modules() for name, _ in m.named_buffers())
    for layer in pruning.layers:
        assert type(layer.producer.weight) is nn.Parameter
        assert torch.equal(layer.producer.weight, effective[layer.name])
        if strategy == "parametrize":
            assert layer.producer.weight[pruning.pruned[layer.name]].abs().max() == 0
    network.eval()
    network(images)  # still runs as a plain network
