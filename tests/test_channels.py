"""Channel topology: producers, channel points, consumers and residual coupling of real model structures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.graph import Consumer, find_prunable_layers, trace_channel_graph
from pruneflow.models import VGG, ConvNet, ResNet
from pruneflow.pruning.selection import select_layers


def by_name(model: nn.Module) -> dict:
    return {layer.name: layer for layer in find_prunable_layers(model)}


def test_convnet_channel_points_and_consumers_including_linear_after_flatten() -> None:
    layers = by_name(ConvNet(channels=(4, 8, 16)))
    assert [(n, layer.norm_name) for n, layer in layers.items()] == [
        ("features.0", "features.1"),
        ("features.4", "features.5"),
        ("features.8", "features.9"),
    ]
    assert layers["features.0"].consumers == [Consumer("features.4", "conv")]
    # 28 → 14 → 7 → 3 after three pools: each of the 16 channels feeds 3·3 = 9 flattened features.
    assert layers["features.8"].consumers == [Consumer("classifier.2", "linear", 9)]
    assert not any(layer.coupled for layer in layers.values())


def test_vgg_last_conv_feeds_linear_one_feature_per_channel_after_global_pool() -> None:
    layers = by_name(VGG(layers=[8, "M", 16, 16, "M"]))
    assert list(layers) == ["features.0", "features.4", "features.7"]
    assert layers["features.4"].consumers == [Consumer("features.7", "conv")]
    assert layers["features.7"].consumers == [Consumer("classifier.2", "linear", 1)]


def test_resnet_block_internal_convs_are_free_and_residual_outputs_coupled() -> None:
    layers = by_name(ResNet(depth=20))
    assert layers["layer2.0.conv1"].norm_name == "layer2.0.bn1"
    assert layers["layer2.0.conv1"].consumers == [Consumer("layer2.0.conv2", "conv")]
    assert not layers["layer2.0.conv1"].coupled
    for coupled in ("conv1", "layer1.0.conv2", "layer2.0.shortcut.0", "layer3.2.conv2"):
        assert layers[coupled].coupled, coupled
    default = [layer.name for layer in select_layers(list(layers.values()), None)]
    assert default == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1, 2)]


def test_consumer_columns_follow_channel_major_flatten_order() -> None:
    consumer = Consumer("fc", "linear", 4)
    assert consumer.columns(torch.tensor([0, 2])).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert Consumer("conv", "conv").columns(torch.tensor([3])).tolist() == [3]


def test_conv_without_norm_has_its_own_output_as_channel_point() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    layers = by_name(model)
    assert layers["0"].norm is None and layers["0"].channel_point_name == "0"
    assert layers["0"].consumers == [Consumer("2", "conv")]


def test_untraceable_model_has_no_prunable_space_and_says_why() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return self.bn(self.conv(x))
            return self.conv(x)

    # A guess must not decide what gets pruned: without a graph, who reads a channel is unknown.
    assert find_prunable_layers(Dynamic()) == []
    (space,) = trace_channel_graph(Dynamic()).spaces
    assert space.names == ["conv"] and not space.prunable and "torch.fx cannot trace Dynamic" in space.refusals[0]


def test_layer_globs_select_and_unknown_glob_is_a_clear_error() -> None:
    layers = find_prunable_layers(ResNet(depth=20))
    chosen = select_layers(layers, ["layer2.*.conv1"])
    assert [layer.name for layer in chosen] == ["layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1"]
    with pytest.raises(ConfigError, match=r"'features\.\*' matches no conv or linear layer; the model's are: conv1"):
        select_layers(layers, ["features.*"])
