"""CIFAR ResNet (He et al. 2016, §4.2): depth 6n+2 with three stages of n basic blocks (20, 32, 56, ...).

Channels inside a block (``layerS.B.conv1`` → ``bn1`` → ``act1`` → ``conv2``) are free to prune. The
output of ``conv2``/``bn2`` is added to the shortcut, so its channels are coupled across the whole
stage; the shortcut uses a 1×1 conv + BN projection (option B) where the shape changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pruneflow.errors import ConfigError
from pruneflow.models.blocks import check_activation, make_activation


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """``conv1``/``bn1``/``act1`` stem, ``layer1..3`` of BasicBlocks, then ``pool`` → ``flatten`` → ``fc``."""

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        depth: int = 20,
        width: int = 16,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_activation(activation)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"model.depth must be 6n+2 with n >= 1 (20, 32, 56, ...), got {depth}")
        if width < 1:
            raise ConfigError(f"model.width must be >= 1, got {width}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(int(input_shape[0]), width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        in_channels = width
        stages = []
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, activation))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))
