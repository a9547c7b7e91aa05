"""ConvNet: the small MNIST / Fashion-MNIST classifier (conv → BN → act → pool blocks, then a linear).

The linear classifier reads the flattened last feature map, so each channel of the last conv feeds
``H·W`` consecutive input features of ``classifier.1`` — the consumer slice that pruning must follow.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pruneflow.errors import ConfigError
from pruneflow.models.blocks import check_activation, conv_bn_act


class ConvNet(nn.Module):
    """``features`` = [conv, bn, act, (conv, bn, act,) maxpool] per stage; ``classifier`` = flatten → linear.

    ``channels`` lists the stages' widths; ``convs_per_stage`` convs each; every stage halves H and W.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (24, 48, 96),
        convs_per_stage: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if not channels or any(int(c) <= 0 for c in channels):
            raise ConfigError(f"model.channels must be a non-empty list of positive widths, got {list(channels)}")
        if convs_per_stage < 1:
            raise ConfigError(f"model.convs_per_stage must be >= 1, got {convs_per_stage}")
        in_channels, height, width = (int(v) for v in input_shape)
        layers: list[nn.Module] = []
        for stage_width in channels:
            for _ in range(convs_per_stage):
                layers += conv_bn_act(in_channels, int(stage_width), activation)
                in_channels = int(stage_width)
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ConfigError(
                f"model.channels has {len(channels)} stages, too many for a {input_shape[1]}×{input_shape[2]} input"
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * height * width, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
