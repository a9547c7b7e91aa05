"""Issue 31's timm patterns on tiny networks written here: a module called more than once (CoaT's parallel block
applies one MLP to several streams), pruned like one call where every call reads the same space and refused in one
line where the calls read different spaces; and a split of a space by constant sizes whose owner's sizes the cut
can set (FasterNet's partial conv, CSPDarkNet's cross stage), each part cut on its own and the split's sizes set to
the channels each part keeps."""

from __future__ import annotations

import pytest
import torch
from test_graph_cnn_rules import conv_bn, head
from test_graph_defects import assert_cut_equals_masked
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow.compaction import Compaction, CompactionError, compact
from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import register_split_sizes, trace_channel_graph
from pruneflow.graph.handlers.reorderings import first_size_in, halves_of, sizes_in


def mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, width, 1))


class SharedMlp(nn.Module):
    """CoaT's parallel block: one MLP added to two streams that a residual makes one space."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm_a, self.norm_b = conv_bn(3, 8), conv_bn(3, 8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.mlp, self.head = mlp(8, 12), head(8)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        y = b + self.mlp(self.norm_b(b))  # the first call reads b before the residual makes a and b one space
        a = a + b
        a = a + self.mlp(self.norm_a(a))
        return self.head(a + y)


class AliasedMlp(SharedMlp):
    """CoaT builds its shared MLP as ``self.mlp2 = self.mlp3 = Mlp(...)``: one module under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp_b = self.mlp

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        a = a + b
        return self.head(a + self.mlp(self.norm_a(a)) + b + self.mlp_b(self.norm_b(b)))


class MlpOnTwoSpaces(nn.Module):
    """One MLP on two streams that are different spaces: no cut of its columns fits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mlp, self.head = conv_bn(3, 8), conv_bn(3, 8), mlp(8, 12), head(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.mlp(self.a(x)), self.mlp(self.b(x))], dim=1))


def test_a_module_called_on_one_space_several_times_is_pruned_like_one_call() -> None:
    graph = trace_channel_graph(SharedMlp())
    stream = next(space for space in graph.spaces if "a.0" in space.names)
    hidden = next(space for space in graph.spaces if "mlp.0" in space.names)
    assert stream.prunable and hidden.prunable, (stream.refusals, hidden.refusals)
    assert sorted(stream.names) == ["a.0", "b.0", "mlp.2"]  # mlp.2 once, though called twice
    assert [consumer.name for consumer in hidden.consumers] == ["mlp.2"]
    assert_cut_equals_masked(SharedMlp())


def test_a_module_under_two_names_is_one_module_not_tied_parameters() -> None:
    graph = trace_channel_graph(AliasedMlp())
    hidden = next(space for space in graph.spaces if "mlp.0" in space.names)
    assert hidden.prunable, hidden.refusals
    assert_cut_equals_masked(AliasedMlp())


def test_a_module_called_on_different_spaces_refuses_them_in_one_line() -> None:
    graph = trace_channel_graph(MlpOnTwoSpaces())
    reason = "mlp.0 is called 2 times on different channel spaces"
    for name in ("a.0", "b.0"):
        space = next(space for space in graph.spaces if name in space.names)
        assert len(space.refusals) == 1 and reason in space.refusals[0], space.refusals
    hidden = next(space for space in graph.spaces if "mlp.0" in space.names)
    assert reason in hidden.refusals  # and mlp.2's, which reads it and the second call's hidden space


class PartialConv(nn.Module):
    """FasterNet's PConv: a 3×3 conv on the first ``dim_conv3`` channels, the other ``dim_untouched`` untouched."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dim_conv3, self.dim_untouched = width // 4, width - width // 4
        self.partial_conv3 = nn.Conv2d(self.dim_conv3, self.dim_conv3, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = torch.split(x, [self.dim_conv3, self.dim_untouched], dim=1)
        return torch.cat((self.partial_conv3(x1), x2), 1)


class FasterStage(nn.Module):
    """A FasterNet stage: two blocks ``x + mlp(pconv(x))`` on one residual stream, each splitting it alike."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = conv_bn(3, 16), head(16)
        self.mixers = nn.ModuleList([PartialConv(16), PartialConv(16)])
        self.mlps = nn.ModuleList([nn.Sequential(conv_bn(16, 24), nn.Conv2d(24, 16, 1)) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for mixer, mlp in zip(self.mixers, self.mlps, strict=True):
            x = x + mlp(mixer(x))
        return self.head(x)


class CrossStage(nn.Module):
    """CSPDarkNet's cross stage: an expansion conv split in halves by ``expand_chs // 2``; the first through a
    residual block, the second across; concatenated again for the transition conv."""

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs = 12
        self.conv_exp, self.conv1, self.conv2 = conv_bn(3, 12), conv_bn(6, 4), conv_bn(4, 6)
        self.conv_transition, self.head = conv_bn(12, 8), head(8)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        x1 = x1 + self.conv2(self.conv1(x1))
        return self.head(self.conv_transition(torch.cat([x1, x2], dim=1)))


register_split_sizes(PartialConv, sizes_in("dim_conv3", "dim_untouched"))
register_split_sizes(CrossStage, halves_of("expand_chs"))


def cut_equal_to_masked(model: nn.Module) -> Compaction:
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    images = torch.randn(4, 3, 6, 6)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction


def test_a_split_by_sizes_its_owner_holds_cuts_each_part_and_sets_the_sizes() -> None:
    """Each part keeps its share of the channels; the cut needs no zero channels, and sets the sizes it keeps."""
    graph = trace_channel_graph(FasterStage())
    stream = next(space for space in graph.spaces if "stem.0" in space.names)
    assert stream.prunable and not stream.reordered, stream.refusals
    assert [(split.owner, split.sizes) for split in stream.splits] == [("mixers.0", (4, 12)), ("mixers.1", (4, 12))]
    assert list(stream.route_slots(0.5).values()) == [2, 6]
    compaction = cut_equal_to_masked(FasterStage())
    for name in ("mixers.0", "mixers.1"):
        assert compaction.sizes[name] == {"dim_conv3": 2, "dim_untouched": 6}
        mixer = compaction.model.get_submodule(name)
        assert (mixer.dim_conv3, mixer.partial_conv3.in_channels, mixer.dim_untouched) == (2, 2, 6)
    assert compaction.model.stem[0].out_channels == 8 and not compaction.padding


def test_a_fresh_network_given_the_cut_sizes_splits_as_the_cut_one() -> None:
    compaction = cut_equal_to_masked(FasterStage())
    fresh = apply_sizes(FasterStage(), compaction.sizes)
    fresh.load_state_dict(compaction.model.state_dict())
    images = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), compaction.model.eval()(images))


def test_a_split_in_halves_keeps_the_first_part_no_smaller() -> None:
    graph = trace_channel_graph(CrossStage())
    expansion = next(space for space in graph.spaces if "conv_exp.0" in space.names)
    assert expansion.prunable and [split.sizes for split in expansion.splits] == [(6, 6)]
    assert list(expansion.route_slots(0.45).values()) == [4, 3]  # 7 kept: the first half takes the odd one
    compaction = cut_equal_to_masked(CrossStage())
    assert compaction.sizes[""] == {"expand_chs": 6} and compaction.model.expand_chs == 6
    assert compaction.model.conv_transition[0].in_channels == 6


def test_split_sizes_the_owner_cannot_take_are_refused_in_one_line() -> None:
    with pytest.raises(CompactionError, match=r"^cannot cut conv_exp\.0: CrossStage \(the model\) cannot split it"):
        compact(CrossStage(), {"conv_exp.0": [0, 1, 2]})


class Widening(nn.Module):
    """RexNet's block: its output conv widens the stream, and the stream is added to its first ``in_channels``."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.in_channels = width
        self.conv_exp, self.conv_pwl = conv_bn(width, 2 * width), nn.Sequential(nn.Conv2d(2 * width, out, 1),
                                                                                  nn.BatchNorm2d(out))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_pwl(self.conv_exp(x))
        return torch.cat([x[:, 0 : self.in_channels] + shortcut, x[:, self.in_channels :]], dim=1)


class WideningStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = conv_bn(3, 4), nn.Sequential(Widening(4, 6), Widening(6, 10)), head(10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


register_split_sizes(Widening, first_size_in("in_channels"))


def test_a_stream_added_to_the_first_channels_of_a_wider_conv_is_those_channels() -> None:
    """The stream's producers write channels 0…3 of the last block's space: their rows are cut with them."""
    graph = trace_channel_graph(WideningStage())
    stream = next(space for space in graph.spaces if "blocks.1.conv_pwl.0" in space.names)
    assert stream.prunable and stream.names == ["blocks.1.conv_pwl.0"], stream.refusals
    stem = next(point for point in stream.points if point.name == "stem.0")
    assert stem.at == (0, 1, 2, 3, -1, -1, -1, -1, -1, -1)
    assert not any("stem.0" in space.names for space in graph.spaces)
    compaction = cut_equal_to_masked(WideningStage())
    assert (compaction.model.blocks[0].in_channels, compaction.model.blocks[1].in_channels) == (2, 3)
    assert compaction.model.stem[0].out_channels == 2 and compaction.model.head[2].in_features == 5


class DualPath(nn.Module):
    """DPN's block: a residual path (the first ``num_1x1_c`` channels of its input, or of a projection of it) plus
    a conv, and a dense path (the rest) concatenated with another conv's output."""

    def __init__(self, width: int, projected: bool) -> None:
        super().__init__()
        self.num_1x1_c = 4
        self.proj = nn.Conv2d(width, 6, 1) if projected else None
        self.c1x1_a, self.c1, self.c2 = conv_bn(width, 6), nn.Conv2d(6, 4, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x_s = self.proj(x) if self.proj is not None else x
        x_s1, x_s2 = x_s[:, : self.num_1x1_c], x_s[:, self.num_1x1_c :]
        y = self.c1x1_a(x)
        return torch.cat([x_s1 + self.c1(y), x_s2, self.c2(y)], dim=1)


class DualPathStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = conv_bn(3, 6), head(10)
        self.blocks = nn.Sequential(DualPath(6, projected=True), DualPath(8, projected=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


register_split_sizes(DualPath, first_size_in("num_1x1_c"))


def test_slices_of_a_concatenation_at_a_held_position_inside_its_first_space_are_parts_of_that_space() -> None:
    """DPN: the second block slices the concatenation (projection, dense path) inside the projection's channels."""
    graph = trace_channel_graph(DualPathStage())
    projection = next(space for space in graph.spaces if "blocks.0.proj" in space.names)
    assert projection.prunable, projection.refusals
    assert [(split.owner, split.sizes) for split in projection.splits] == [("blocks.0", (4, 2)), ("blocks.1", (4, 2))]
    compaction = cut_equal_to_masked(DualPathStage())
    assert [block.num_1x1_c for block in compaction.model.blocks] == [2, 2]
