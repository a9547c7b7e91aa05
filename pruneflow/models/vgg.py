"""VGG for CIFAR-10: a configurable list of conv widths and 'M' (max-pool) markers, then a linear.

After the last stage a global average pool reduces each channel to one feature, so channel ``c`` of
the last conv feeds exactly input feature ``c`` of ``classifier.2``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pruneflow.errors import ConfigError
from pruneflow.models.blocks import check_activation, conv_bn_act

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """``features``: conv → BN → act per width, MaxPool2d per "M"; ``classifier``: pool → flatten → linear."""

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        layers: Sequence[int | str] = VGG11,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_activation(activation)
        in_channels = int(input_shape[0])
        modules: list[nn.Module] = []
        for item in layers:
            if item == "M":
                modules.append(nn.MaxPool2d(2))
            elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
                modules += conv_bn_act(in_channels, item, activation)
                in_channels = item
            else:
                raise ConfigError(f"model.layers entries must be positive ints or 'M', got {item!r}")
        if not any(isinstance(m, nn.Conv2d) for m in modules):
            raise ConfigError(f"model.layers must hold at least one conv width, got {list(layers)}")
        self.features = nn.Sequential(*modules)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
