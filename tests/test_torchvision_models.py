"""``model=torchvision``: torchvision's classifiers by name, sized by the data, pruned and compacted end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import QUIET, run_train
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.models import torchvision_classifier


def test_cifar_stem_input_channels_and_classes_follow_the_config_and_data() -> None:
    network = torchvision_classifier("resnet18", input_shape=(1, 16, 16), num_classes=7, cifar_stem=True)
    assert network.conv1.kernel_size == (3, 3) and network.conv1.stride == (1, 1) and network.conv1.in_channels == 1
    assert isinstance(network.maxpool, nn.Identity)
    assert network(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    plain = torchvision_classifier("resnet18", input_shape=(3, 16, 16), num_classes=7)
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)


def test_weights_come_from_a_local_file_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision_classifier("mobilenet_v3_small", num_classes=4)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    torch.manual_seed(2)
    loaded = torchvision_classifier("mobilenet_v3_small", num_classes=4, weights=tmp_path / "weights.pt")
    pairs = zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ConfigError, match=r"model.weights=.*does not fit mobilenet_v3_small with 5 classes"):
        torchvision_classifier("mobilenet_v3_small", num_classes=5, weights=tmp_path / "weights.pt")


@pytest.mark.parametrize(
    ("name", "cifar_stem", "message"),
    [
        ("resnet19", False, r"'resnet19' is not a torchvision classification model; choose one of: .*resnet18"),
        ("vgg11", True, r"model.cifar_stem=true is for ResNets \(a conv1 and a maxpool\); vgg11 has neither"),
    ],
)
def test_bad_names_and_options_are_one_line(name: str, cifar_stem: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        torchvision_classifier(name, cifar_stem=cifar_stem)
    assert "\n" not in str(error.value)


def train_pruned_and_compacted(
    tmp_path: Path, name: str, side: int, num_train: int, num_test: int, batch_size: int
) -> dict[str, Any]:
    """``train.py`` on synthetic RGB images: torchvision's ``name``, every space (coupled groups too) pruned with
    ``activation``, one epoch, then compacted; returns its ``metrics.json``."""
    run_dir = tmp_path / "run"
    result = run_train(
        "data=synthetic", f"data.input_shape=[3,{side},{side}]", f"data.num_train={num_train}",
        f"data.num_test={num_test}", f"data.batch_size={batch_size}", "model=torchvision", f"model.name={name}",
        "mask=activation", "mask.groups=true", "trainer.max_epochs=1", "compact=true", f"hydra.run.dir={run_dir}",
        *QUIET,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_train_prunes_coupled_groups_of_a_torchvision_resnet_and_compacts_exactly(tmp_path: Path) -> None:
    metrics = train_pruned_and_compacted(tmp_path, "resnet18", side=16, num_train=64, num_test=32, batch_size=32)
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_abs_diff"] <= 1e-4
    pruned = metrics["mask/pruned_channels"]
    assert pruned["conv1"] == pruned["layer1.0.conv2"] == pruned["layer1.1.conv2"] == 32  # the stem's group
    assert metrics["compact/flops_ratio"] > 2.5


@pytest.mark.slow
def test_train_prunes_convnext_residual_streams_through_layer_norms_and_compacts_exactly(tmp_path: Path) -> None:
    """ConvNeXt's residual stream (stem or downsampling conv, depthwise convs, each block's second linear
    layer, its LayerNorms and layer scales) is one coupled group per stage; pruned at 50 % with the blocks'
    hidden spaces, most of the FLOPs go and the cut network computes what the masked one did."""
    metrics = train_pruned_and_compacted(tmp_path, "convnext_tiny", side=32, num_train=32, num_test=16, batch_size=16)
    assert metrics["compact/agreement"] == 1.0 and metrics["compact/max_rel_diff"] <= 1e-4
    pruned = metrics["mask/pruned_channels"]
    assert pruned["features.0.0"] == pruned["features.1.0.block.0"] == pruned["features.1.2.block.5"] == 48
    assert metrics["compact/flops_ratio"] > 3.5
