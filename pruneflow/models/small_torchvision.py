"""Small CIFAR-sized networks built from torchvision's own classes: MobileNetV2, MobileNetV3, ConvNeXt, ViT.

The findings grid (docs/FINDINGS.md) asks what each masking strategy does to the blocks people train —
inverted residuals (a projection conv + BatchNorm with no activation after it, ReLU6, hard-swish,
squeeze-and-excitation gates, depthwise convs), ConvNeXt blocks (depthwise 7×7, LayerNorm across the channels,
GELU, layer scale) and transformer blocks (an embedding width coupled through every residual and LayerNorm,
the MLP's hidden width, attention heads). These builders keep torchvision's classes, so the channel graph
reads exactly the blocks torchvision users train, and only shrink them: widths, depths and the stem's stride
are config values, chosen for 32×32 images and minutes of CPU training (conf/model/<family>.yaml).

What is swapped after construction, and why: the first conv takes the data's input channels and the config's
stem stride (torchvision's stride-2 or stride-4 stem would leave a 32-px image 8×8 before the first block), and
MobileNetV2's 1,280-wide last conv, fixed in its constructor, becomes ``last_channel`` wide.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.models.torchvision_zoo import conv_like, replace_module

# MobileNetV3-Small's first five rows at a 1-stride stem: SE with ReLU, no SE, SE with hard-swish.
MOBILENET_V3_SETTING = (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 120, 40, True, "HS", 1),
)  # fmt: skip


def _fit_stem(network: nn.Module, input_channels: int, stride: int | None = None, patchify: bool = False) -> None:
    """The first conv reads ``input_channels`` and strides by ``stride`` where given. A 3×3 stem keeps its
    kernel, padding and torchvision's initialisation (only the stride changes); a patchify stem (``patchify``)
    gets a ``stride``×``stride`` kernel, and a conv whose shape changes is a fresh one."""
    name, first = next((name, module) for name, module in network.named_modules() if isinstance(module, nn.Conv2d))
    changes: dict[str, object] = {}
    if stride is not None:
        _positive("stem_stride", stride)
        first.stride = (stride, stride)
        if patchify and first.kernel_size != (stride, stride):
            changes["kernel_size"] = stride
    if first.in_channels != input_channels:
        changes["in_channels"] = input_channels
    if changes:
        replace_module(network, name, conv_like(first, **changes))


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"model.{key} must be positive, got {value!r}")


def _rows(key: str, rows: Sequence[Sequence[object]], length: int, fields: str) -> list[list]:
    """``rows`` as lists of ``length`` values each, else one line naming the bad value and the expected fields."""
    if not rows or any(isinstance(row, str) or not isinstance(row, Sequence) or len(row) != length for row in rows):
        raise ConfigError(f"model.{key} needs a list of rows of {length} values [{fields}], got {rows!r}")
    return [list(row) for row in rows]


def mobilenet_v2(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    width_mult: float = 1.0,
    inverted_residual_setting: Sequence[Sequence[int]] = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2)),
    last_channel: int = 256,
    stem_stride: int = 1,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ``MobileNetV2`` with rows [expansion t, width c, blocks n, first stride s]: inverted residuals
    (1×1 expansion → ReLU6 → depthwise 3×3 → ReLU6 → 1×1 projection → BatchNorm, no activation, added to the
    block's input when the shape allows), a ``last_channel``-wide 1×1 conv, pooling and a linear classifier."""
    import torchvision
    from torchvision.ops import Conv2dNormActivation

    _positive("width_mult", width_mult)
    _positive("last_channel", last_channel)
    setting = _rows("inverted_residual_setting", inverted_residual_setting, 4, "t, c, n, s")
    network = torchvision.models.MobileNetV2(num_classes=int(num_classes), width_mult=width_mult,
                                             inverted_residual_setting=setting, dropout=dropout)  # fmt: skip
    _fit_stem(network, int(input_shape[0]), stride=stem_stride)
    last_input = network.features[-1][0].in_channels
    network.features[-1] = Conv2dNormActivation(last_input, last_channel, kernel_size=1, activation_layer=nn.ReLU6)
    network.classifier[-1] = nn.Linear(last_channel, int(num_classes))
    network.last_channel = last_channel
    return network


def mobilenet_v3(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    inverted_residual_setting: Sequence[Sequence[object]] = MOBILENET_V3_SETTING,
    last_channel: int = 256,
    stem_stride: int = 1,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ``MobileNetV3`` with rows [input, kernel, expanded, output, SE, "RE" | "HS", stride]:
    inverted residuals with ReLU or hard-swish and squeeze-and-excitation gates (hard-sigmoid: 0.5 at 0), then
    a 1×1 conv to 6× the last width, pooling, a ``last_channel``-wide linear, hard-swish and the classifier."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    _positive("last_channel", last_channel)
    rows = _rows("inverted_residual_setting", inverted_residual_setting, 7,
                 "input, kernel, expanded, output, use_se, RE|HS, stride")  # fmt: skip
    for row in rows:
        if row[5] not in ("RE", "HS"):
            raise ConfigError(f"model.inverted_residual_setting: the activation is RE or HS, got {row[5]!r} in {row}")
    setting = [InvertedResidualConfig(*row[:6], stride=row[6], dilation=1, width_mult=1.0) for row in rows]
    network = MobileNetV3(setting, last_channel=last_channel, num_classes=int(num_classes), dropout=dropout)
    _fit_stem(network, int(input_shape[0]), stride=stem_stride)
    return network


def convnext(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    block_setting: Sequence[Sequence[int | None]] = ((32, 64, 1), (64, 128, 1), (128, None, 2)),
    stem_stride: int = 2,
    layer_scale: float = 1e-6,
    stochastic_depth_prob: float = 0.0,
) -> nn.Module:
    """torchvision's ``ConvNeXt`` with stages [width, next stage's width or null, blocks]: each block a depthwise
    7×7 conv, a LayerNorm across the channels, a 4× MLP with GELU and a per-channel layer scale on the residual;
    the stem is a ``stem_stride``×``stem_stride`` patchify conv (torchvision's 4×4 would leave 8×8 at 32 px)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = _rows("block_setting", block_setting, 3, "input width, output width or null, blocks")
    network = ConvNeXt([CNBlockConfig(*stage) for stage in stages], stochastic_depth_prob=stochastic_depth_prob,
                       layer_scale=layer_scale, num_classes=int(num_classes))  # fmt: skip
    _fit_stem(network, int(input_shape[0]), stride=stem_stride, patchify=True)
    return network


def vit(
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 10,
    patch_size: int = 4,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 96,
    mlp_dim: int = 192,
    dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ``VisionTransformer`` for square images of ``input_shape``: a ``patch_size`` patchify conv to
    ``hidden_dim``, a class token, ``num_layers`` pre-norm encoder blocks (LayerNorm → ``num_heads``-head
    attention → residual, LayerNorm → ``mlp_dim`` GELU MLP → residual), a final LayerNorm and the head."""
    import torchvision

    size = int(input_shape[-1])
    if int(input_shape[-2]) != size or size % patch_size:
        raise ConfigError(f"model.patch_size={patch_size} must divide the square image side; got images "
                          f"{tuple(input_shape[-2:])}")  # fmt: skip
    if hidden_dim % num_heads:
        raise ConfigError(f"model.hidden_dim={hidden_dim} must be a multiple of model.num_heads={num_heads}")
    network = torchvision.models.VisionTransformer(
        image_size=size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim,
        mlp_dim=mlp_dim, dropout=dropout, num_classes=int(num_classes),
    )  # fmt: skip
    _fit_stem(network, int(input_shape[0]))
    return network
