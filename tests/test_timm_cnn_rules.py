"""The channel graph on what timm's smallest models are built from, where a cut raised or a whole model was
refused: each rule on the smallest module that shows it (seconds), half of every prunable space masked and cut,
and the cut network equal to the masked one — or the space refused in one line, never an exception."""

from __future__ import annotations

import pytest
import torch
from test_graph_defects import assert_cut_equals_masked
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow.graph import trace_channel_graph


def refusals(model: nn.Module) -> dict[str, list[str]]:
    return {space.name: space.refusals for space in trace_channel_graph(model).spaces if not space.prunable}


class ReshapedByAnotherWidth(nn.Module):
    """PVT-v2's spatial reduction: ``sr(x).reshape(B, C, -1)``, C read from the shape of ``x``, not of ``sr(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.stem = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU()), nn.Conv2d(6, 8, 1)
        self.sr, self.head = nn.Conv2d(8, 8, 2, stride=2), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.pre(x))
        batch, channels = x.shape[0], x.shape[1]
        reduced = self.sr(x).reshape(batch, channels, -1)
        return self.head(reduced.mean(-1))


def test_a_tensor_reshaped_by_another_tensors_width_is_refused_not_cut() -> None:
    """It raised in the cut network (PVT-v2's LayerNorm after ``sr`` got the stream's width): sr was cut alone."""
    refused = refusals(ReshapedByAnotherWidth())
    assert "reshapes them by another tensor's width" in " ".join(refused["sr"]), refused
    assert_cut_equals_masked(ReshapedByAnotherWidth())  # ``pre`` alone is cut


class UnfoldedByHeads(nn.Module):
    """VOLO's outlook attention: ``unfold(v(x)).reshape(B, heads, C // heads, ...)``, C read from ``x``'s shape."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.stem = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU()), nn.Conv2d(6, 8, 1)
        self.v, self.unfold, self.head = nn.Conv2d(8, 8, 1), nn.Unfold(3, padding=1), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.pre(x))
        batch, channels = x.shape[0], x.shape[1]
        values = self.unfold(self.v(x)).reshape(batch, 2, channels // 2, -1)
        return self.head(values.mean(-1).flatten(1))


def test_arithmetic_on_a_width_read_from_a_shape_is_that_width() -> None:
    """VOLO raised in the cut: ``C // heads`` was not followed as a width, so the stream was cut under it."""
    refused = refusals(UnfoldedByHeads())
    assert "sizes a tensor by their width" in " ".join(refused["stem"]), refused
    assert_cut_equals_masked(UnfoldedByHeads())  # ``pre`` alone is cut


def test_a_scaled_standardised_convs_rows_are_cut_with_their_gain_and_its_inputs_refused() -> None:
    """NFNet was refused entirely: the gain, one entry per row, was said not to be rebuilt by the cut."""
    timm = pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    def scaled(cin: int, cout: int, groups: int = 1) -> nn.Module:
        conv = timm.layers.ScaledStdConv2d(cin, cout, 3, groups=groups, gamma=1.7)
        nn.init.uniform_(conv.gain, 0.5, 2.0)  # one gain per row, each its own: a row cut with another's would show
        return conv

    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), scaled(8, 8), nn.ReLU(), scaled(8, 8, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))  # fmt: skip
    refused = refusals(model)
    assert list(refused) == ["0", "8"] and "standardises its kernel over its input channels" in refused["0"][0]
    assert_cut_equals_masked(model)  # the rows of 2, carried through the depthwise 4, and 4's gain with them


class RmsNormed(nn.Module):
    """MobileNetV5's norms: timm's ``RmsNormAct2d`` after each conv, an ``RmsNorm2d`` over a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import RmsNorm2d, RmsNormAct2d

        def conv_rms(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), RmsNormAct2d(cout, act_layer=nn.GELU))

        self.a, self.b, self.c, self.norm = conv_rms(3, 8), conv_rms(8, 8), conv_rms(8, 6), RmsNorm2d(8)
        for norm in (self.a[1], self.b[1], self.norm):
            nn.init.uniform_(norm.weight, 0.5, 2.0)  # γ of each channel its own: a γ cut with another would show
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        return self.head(self.c(self.norm(x + self.b(x))))


def test_an_rms_norm_is_recomputed_over_the_kept_channels_and_cut_with_them() -> None:
    """MobileNetV5 was refused entirely: RmsNorm2d's ``x.pow(2)`` was traced into and not understood."""
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    assert list(refusals(RmsNormed())) == ["head.2"]
    assert_cut_equals_masked(RmsNormed())


def test_vggs_conv_mlp_head_is_two_producers_and_cuts_exactly() -> None:
    """VGG's ``ConvMlp`` pre-logits, kept whole, was not understood: the last stage and both of its convs were
    refused (vgg11 2.58×, Torch-Pruning 3.96×)."""
    pytest.importorskip("timm")
    from timm.models.vgg import ConvMlp

    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          ConvMlp(8, 12, kernel_size=7, drop_rate=0.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 5))  # fmt: skip
    assert list(refusals(model)) == ["6"]
    assert [space.name for space in trace_channel_graph(model).prunable] == ["0", "3.fc1", "3.fc2"]
    assert_cut_equals_masked(model)  # a 6 × 6 input: pooled up to 7 × 7 inside


class GroupNormed(nn.Module):
    """BiT's (and the R26-ViT hybrids') conv, GroupNorm and activation: torch's ``nn.GroupNorm`` after one conv,
    timm's ``GroupNormAct`` after another, a GroupNorm over a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import GroupNormAct

        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), GroupNormAct(8, num_groups=2))
        self.norm, self.head = nn.GroupNorm(4, 8), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        for norm in (self.a[1], self.b[1], self.norm):  # γ and β of each channel its own
            nn.init.uniform_(norm.weight, 0.5, 2.0)
            nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        return self.head(self.norm(x + self.b(x)))


def test_a_group_norm_of_several_groups_is_cut_in_whole_groups() -> None:
    """The GroupNorms refused their spaces (vit_tiny_r_s16_p8_224's stem: "32 group(s) of 64 channels")."""
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)

    graph = trace_channel_graph(GroupNormed())
    assert [(space.names, space.block) for space in graph.prunable] == [(["a.0", "b.0"], 4)]  # groups of 2 and 4
    assert_cut_equals_masked(GroupNormed())
    _, compaction = masked_and_cut(GroupNormed(), torch.randn(2, 3, 6, 6))
    assert compaction.sizes["b.1"] == {"num_channels": 4, "num_groups": 1}  # of 2 groups of 4 channels, 1 kept


class GroupNormOnConcatenation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_a_group_norm_reading_several_spaces_refuses_them_naming_its_groups() -> None:
    refused = refusals(GroupNormOnConcatenation())
    assert refused["a"] == refused["b"] == ["GroupNorm norm normalises across channels, 2 group(s) of 8 channels "
                                            "(not supported)"]  # fmt: skip


def test_an_explicit_list_naming_part_of_a_group_norms_group_is_refused_in_one_line() -> None:
    pytest.importorskip("timm")
    import pruneflow.graph.handlers.timm_layers  # noqa: F401  (timm is imported: its rules register at trace)
    from pruneflow.errors import ConfigError
    from pruneflow.pruning.criteria import Explicit

    spaces = trace_channel_graph(GroupNormed()).spaces
    Explicit({"a.0": [4, 5, 6, 7]}).check(spaces)
    with pytest.raises(ConfigError, match=r"must name whole groups .* in groups of 4 channels, e.g. \[0, 1, 2, 3\]"):
        Explicit({"a.0": [1, 2]}).check(spaces)
