"""The channel graph's rules for what timm's CNNs are built from, each on a tiny network written here: a
subtraction joins like an addition (PoolFormer's ``pool(x) - x``), upsampling and zero padding keep every channel
(HRNet's fuse layers, TResNet's padding), a division by a number keeps zeros, a spatial mean is (N, C) for a
BatchNorm1d (RepViT's head), a slice of all the channels is the tensor itself (GhostNet's ``out[:, :C]``), and a
residual or a gate whose one side is a single conv's output while the other carries several spaces folds that
conv's rows into those spaces (Inception-ResNet's ``conv(x) * s + x`` after a concatenation, an SE gate on a
concatenation, as CSPNeXt and GhostNet build them). Each is traced, half of every space masked and cut, and the cut
network equal to the masked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_graph_defects import assert_cut_equals_masked
from torch import Tensor, nn

from pruneflow.graph import trace_channel_graph


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def head(width: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


class PoolMixer(nn.Module):
    """PoolFormer's token mixer: ``pool(x) - x``, added to the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pool, self.head = conv_bn(3, 8), nn.AvgPool2d(3, 1, 1), head(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x + (self.pool(x) - x))


class Resampled(nn.Module):
    """An upsampling module, ``F.interpolate`` and zero padding between convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.up, self.b, self.c, self.head = conv_bn(3, 8), nn.Upsample(scale_factor=2), conv_bn(8, 8), \
            conv_bn(8, 6), head(6)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        x = self.b(self.up(self.a(x)))
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.head(self.c(F.pad(x, (1, 1, 1, 1))))


class MeanHead(nn.Module):
    """RepViT's head: a spatial mean, a BatchNorm1d, two linear layers averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm, self.a, self.b = conv_bn(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stem(x).mean((2, 3)))
        return (self.a(x) + self.b(x)) / 2


class Ghost(nn.Module):
    """GhostNet's module: a conv and a cheap depthwise conv of it side by side, sliced to the output width."""

    def __init__(self, keep: int = 16) -> None:
        super().__init__()
        self.keep = keep
        self.primary, self.cheap = conv_bn(3, 8), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.head = head(keep)

    def forward(self, x: Tensor) -> Tensor:
        a = self.primary(x)
        return self.head(torch.cat([a, self.cheap(a)], dim=1)[:, : self.keep])


class ResidualOnConcatenation(nn.Module):
    """Inception-ResNet's block after a concatenation: ``conv(x) * 0.17 + x``, x carrying two spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mix, self.head = conv_bn(3, 4), conv_bn(3, 6), nn.Conv2d(10, 10, 1), head(10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(torch.relu(self.mix(x) * 0.17 + x))


class GateOnConcatenation(nn.Module):
    """A squeeze-and-excitation gate on a concatenation (CSPNeXt's channel attention, GhostNet's SE)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc, self.gate, self.head = conv_bn(3, 4), conv_bn(3, 6), nn.Conv2d(10, 10, 1), \
            nn.Hardsigmoid(), head(10)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(x * self.gate(self.fc(x.mean((2, 3), keepdim=True))))


class ConcatenationOnAConv(nn.Module):
    """NASNet's first cell: two convs of the previous cell side by side, normalised, added to a conv of this one's
    input (``bn(cat([path_1(p), path_2(p)])) + conv_1x1(x)``), each read on its own too (so neither folds)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.path_1, self.path_2, self.norm = conv_bn(3, 8), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1), \
            nn.BatchNorm2d(10)  # fmt: skip
        self.conv_1x1, self.left, self.right, self.head = conv_bn(8, 10), conv_bn(10, 10), conv_bn(10, 10), head(40)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        left, right = self.norm(torch.cat([self.path_1(x), self.path_2(x)], dim=1)), self.conv_1x1(x)
        return self.head(torch.cat([left, right + left, self.left(left), self.right(right)], dim=1))


def refusals(model: nn.Module) -> list[list[str]]:
    return [space.refusals for space in trace_channel_graph(model).spaces if not space.prunable]


OUTPUT = ["reaches the network's output, whose shape would change"]


@pytest.mark.parametrize(
    "model", [PoolMixer, Resampled, MeanHead, Ghost, ResidualOnConcatenation, GateOnConcatenation,
              ConcatenationOnAConv]
)
def test_a_cnn_rule_leaves_only_the_classifier_refused_and_cuts_exactly(model: type[nn.Module]) -> None:
    assert refusals(model()) == [OUTPUT]
    assert_cut_equals_masked(model())


def test_a_slice_of_part_of_the_channels_refuses_them_naming_the_op() -> None:
    refused = refusals(Ghost(keep=12))
    assert any("getitem() at getitem" in reason for reasons in refused for reason in reasons), refused


def test_a_folded_conv_is_a_point_of_each_space_it_joins_and_no_space_of_its_own() -> None:
    graph = trace_channel_graph(GateOnConcatenation())
    assert "fc" not in [name for space in graph.spaces for name in space.names]
    assert sorted((point.name, point.offset) for space in graph.spaces for point in space.points) == [
        ("fc", 0),
        ("fc", 4),
    ]


def test_timm_linear_is_a_producer() -> None:
    timm = pytest.importorskip("timm")
    model = nn.Sequential(conv_bn(3, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), timm.layers.Linear(8, 5))
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    assert refusals(model) == [OUTPUT]
    assert_cut_equals_masked(model)


def hgnet_block(cin: int, cout: int) -> nn.Sequential:
    """HGNetV2's conv, BatchNorm, ReLU and learnable affine (``scale · x + bias``, one of each for all channels)."""
    from timm.models.hgnet import LearnableAffineBlock

    affine = LearnableAffineBlock(scale_value=1.5, bias_value=0.3)  # a bias ≠ 0: a mask before it would leak
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), affine)


def test_a_learnable_affine_after_a_producer_is_its_channel_point_and_cuts_exactly() -> None:
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    model = nn.Sequential(hgnet_block(3, 8), hgnet_block(8, 8), head(8))
    assert refusals(model) == [OUTPUT]
    assert [layer.channel_point_name for layer in trace_channel_graph(model).layers][:2] == ["0.3", "1.3"]
    assert_cut_equals_masked(model)


class SameDepthwiseOnConcatenation(nn.Module):
    """NASNet's separable conv: timm's ``Conv2dSame`` (a Conv2d subclass) depthwise on a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Conv2dSame

        self.a, self.b, self.depthwise, self.head = conv_bn(3, 4), conv_bn(3, 6), Conv2dSame(10, 10, 3, groups=10), \
            head(10)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.depthwise(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_a_conv_subclass_carrying_several_spaces_is_a_point_of_each() -> None:
    """It raised inside its handler (its output rank unknown for a subclass): NASNet and PNASNet were refused."""
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    assert refusals(SameDepthwiseOnConcatenation()) == [OUTPUT]
    assert_cut_equals_masked(SameDepthwiseOnConcatenation())


class PlusNumber(nn.Module):
    """MobileOne's (FastViT's) branches summed from ``0``; a number other than 0 makes a masked channel live."""

    def __init__(self, number: float = 0) -> None:
        super().__init__()
        self.number, self.a, self.b, self.head = number, conv_bn(3, 8), conv_bn(8, 8), head(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.b(self.a(x) + self.number))


def test_adding_zero_keeps_the_channels_and_adding_another_number_revives_them() -> None:
    assert refusals(PlusNumber()) == [OUTPUT]
    assert_cut_equals_masked(PlusNumber())
    (reason,) = refusals(PlusNumber(0.5))[0]
    assert "add() at add turns a masked channel's 0 into f(0) ≠ 0 before b.0 reads it" in reason


class NormActs(nn.Module):
    """timm's LayerNorm-and-activation over the channels (dim 1 and channels last), and a GroupNorm of one group."""

    def __init__(self, group_norm: bool = False) -> None:
        super().__init__()
        from timm.layers import GroupNorm1Act, LayerNormAct, LayerNormAct2d

        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm_a = GroupNorm1Act(8, act_layer=nn.SiLU) if group_norm else LayerNormAct2d(8, act_layer=nn.Sigmoid)
        self.norm_b, self.linear, self.head = LayerNormAct(8, act_layer=nn.GELU), nn.Linear(8, 6), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_b(self.b(self.norm_a(self.a(x))).permute(0, 2, 3, 1))  # a sigmoid: f(0) ≠ 0, masked after it
        return self.head(self.linear(x).mean((1, 2)))


def test_timm_layer_norm_acts_are_norms_masked_after_their_activation_and_cut_exactly() -> None:
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    graph = trace_channel_graph(NormActs())
    assert graph.layers[0].norm_name == "norm_a"  # a's norm; b's reads it after a permute, a point of b's space
    assert [point.name for point in graph.layers[1].space.points] == ["norm_b"]
    assert refusals(NormActs()) == [OUTPUT]
    assert_cut_equals_masked(NormActs())


def test_a_timm_group_norm_of_one_group_with_its_activation_is_a_norm_over_the_sample_and_cuts_exactly() -> None:
    """``GroupNorm1Act`` was refused ("1 group(s) of 8 channels"): one group spans the sample, as ``GroupNorm1``."""
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    assert refusals(NormActs(group_norm=True)) == [OUTPUT]
    assert_cut_equals_masked(NormActs(group_norm=True))


def test_a_weight_standardised_conv_refuses_what_it_reads_and_its_rows_cut_exactly() -> None:
    """``StdConv2d`` was taken for a plain conv: its input channels were cut, every kernel row's statistics changed,
    and the cut network differed from the masked one, silently."""
    timm = pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    model = nn.Sequential(timm.layers.StdConv2d(3, 16, 3), nn.ReLU(), timm.layers.StdConv2d(16, 8, 3), head(8))
    (first, *_), second = refusals(model)
    assert "StdConv2d 2 standardises its kernel over its input channels" in first and second == OUTPUT
    assert_cut_equals_masked(model)
    scaled = nn.Sequential(timm.layers.ScaledStdConv2d(3, 16, 3), nn.ReLU(), head(16))
    assert refusals(scaled) == [OUTPUT]  # its rows, their gains with them (``test_timm_cnn_rules``)
    assert_cut_equals_masked(scaled)


def test_timm_blur_pool_keeps_the_channels_or_refuses_them_in_one_line() -> None:
    """A ``BlurPool2d`` built without a channel count made ``torch.fx`` fail: the whole model was refused."""
    timm = pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    model = nn.Sequential(conv_bn(3, 8), timm.layers.BlurPool2d(), conv_bn(8, 6), head(6))
    assert refusals(model) == [OUTPUT]
    assert_cut_equals_masked(model)
    per_channel = nn.Sequential(conv_bn(3, 8), timm.layers.BlurPool2d(8), conv_bn(8, 6), head(6))
    assert "BlurPool2d 1 holds one filter per channel for 8 channels" in refusals(per_channel)[0][0]


class ScaledSplitStream(nn.Module):
    """InceptionNeXt's block: the stream split, a depthwise conv on one part, concatenated back, and a layer scale on
    the residual branch it is added to: a reordered space scaled by a per-channel parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.depthwise = conv_bn(3, 8), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.mix, self.gamma, self.head = nn.Conv2d(8, 8, 1), nn.Parameter(torch.full((8,), 0.5)), head(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        kept, mixed = x.split([4, 4], dim=1)
        return self.head(x + self.mix(torch.cat([kept, self.depthwise(mixed)], dim=1)) * self.gamma.view(1, -1, 1, 1))


def test_a_reordered_space_scaled_by_a_per_channel_parameter_is_refused_in_the_graph() -> None:
    """It was called prunable and the cut raised ``CompactionError`` after the pruning (inception_next_atto)."""
    ((reason, *_), output) = refusals(ScaledSplitStream())
    assert "reordered on its way (a split or a shuffle) and scaled by a per-channel parameter the cut" in reason
    assert output == OUTPUT


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "lamp", "bn_gamma"])
def test_every_group_criterion_scores_the_spaces_a_folded_conv_is_a_point_of(criterion: str) -> None:
    """A folded conv is a point with a kernel, not a γ: the norm-reading criteria and regularisers skip it."""
    from pruneflow.pruning.importance import make_importance
    from pruneflow.pruning.sparsity import SparseTraining

    model = GateOnConcatenation()
    spaces = trace_channel_graph(model).prunable
    importance, regularizer = make_importance(criterion, "mean"), SparseTraining("bn_l1", 1e-4, None)
    importance.bind(model)
    regularizer.bind(model, spaces)
    for space in spaces:
        assert importance.scores(space).shape == regularizer.norms(space).shape == (space.width,)
