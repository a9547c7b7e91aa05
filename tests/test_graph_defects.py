"""Issue 31's review defects of the channel graph, each on the smallest network that shows it: a depthwise or grouped
conv reading a shuffled space or one part of a split, and a tracer that raised instead of refusing."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import register_module_handler, trace_channel_graph


def shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1's unit: a 1×1 conv (grouped in ShuffleNet v1) → shuffle → ``reader`` (a depthwise 3×3, or a
    grouped 1×1) → 1×1."""

    def __init__(self, reader_groups: int | None = None, producer_groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 8, 1, groups=producer_groups), nn.BatchNorm2d(8), nn.ReLU())
        groups = 8 if reader_groups is None else reader_groups
        self.reader = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.reader(shuffle(self.grouped(self.stem(x)), 2)))


class SplitUnit(nn.Module):
    """MixNet's MixConv: 1×1 conv → chunk in two → a depthwise 3×3 and a depthwise 5×5 (or ``reader_groups``: a
    grouped conv on the first part) → cat → 1×1."""

    def __init__(self, reader_groups: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        groups = 4 if reader_groups is None else reader_groups
        self.small = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.large = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.head = nn.Sequential(nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.stem(x).chunk(2, dim=1)
        return self.head(torch.cat([self.small(a), self.large(b)], dim=1))


def assert_cut_equals_masked(model: nn.Module) -> None:
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    images = torch.randn(4, 3, 6, 6)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()


def test_a_depthwise_conv_after_a_shuffle_reads_the_shuffled_positions_and_cuts_exactly() -> None:
    """Defect 1: the shuffle's positions were dropped, the cut differed from the masked network by 13 %."""
    graph = trace_channel_graph(ShuffleUnit())
    grouped = next(space for space in graph.spaces if "grouped.0" in space.names)
    assert grouped.names == ["grouped.0"], "a depthwise conv reading a shuffled space is no producer of it"
    assert [point.at for point in grouped.points if point.name == "reader.0"] == [(0, 2, 4, 6, 1, 3, 5, 7)]
    assert_cut_equals_masked(ShuffleUnit())


def test_a_grouped_conv_writing_a_space_a_shuffle_reorders_refuses_it() -> None:
    """ShuffleNet v1's own unit: a cut keeps a group's rows in place, but places shuffled channels on the slots
    of their route; both cannot hold, so the space is refused, in the graph, before any training."""
    graph = trace_channel_graph(ShuffleUnit(producer_groups=2))
    grouped = next(space for space in graph.spaces if "grouped.0" in space.names)
    assert grouped.refusals == ["it is written or read in 2 groups and reordered on its way (a shuffle)"]


def test_a_grouped_conv_reading_a_shuffled_space_refuses_it() -> None:
    """Defect 2: recorded without the shuffle's positions, the cut removed the wrong columns."""
    graph = trace_channel_graph(ShuffleUnit(reader_groups=2))
    grouped = next(space for space in graph.spaces if "grouped.0" in space.names)
    assert not grouped.prunable
    assert grouped.refusals == ["grouped conv reader.0 (groups=2) reads them reordered (a shuffle or a split)"]


def test_depthwise_convs_on_the_parts_of_a_split_read_their_parts_and_cut_exactly() -> None:
    """Defect 3: the depthwise conv on one part became a producer of the whole space; tracing raised IndexError."""
    graph = trace_channel_graph(SplitUnit())
    stem = next(space for space in graph.spaces if "stem.0" in space.names)
    assert stem.names == ["stem.0"] and stem.prunable, stem.refusals
    assert {point.name: point.at for point in stem.points} == {
        "small": (0, 1, 2, 3, -1, -1, -1, -1),
        "large": (-1, -1, -1, -1, 0, 1, 2, 3),
    }
    assert_cut_equals_masked(SplitUnit())


def test_a_grouped_conv_on_one_part_of_a_split_cuts_its_space_in_its_groups_exactly() -> None:
    """Defect 4: called prunable, then the cut raised after the whole fit. A grouped conv reading one part of a split
    now cuts the whole space at the same positions in each block of one group's width (``producers.read_grouped_part``):
    the cut must run, and compute the masked network."""
    stem = next(space for space in trace_channel_graph(SplitUnit(reader_groups=2)).spaces if "stem.0" in space.names)
    assert stem.prunable, stem.refusals
    assert stem.groups == 4  # two parts of 4 channels, each read in 2 groups: blocks of 2
    assert_cut_equals_masked(SplitUnit(reader_groups=2))


class Faulty(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


def test_a_handler_that_raises_refuses_the_spaces_it_reads_naming_the_op() -> None:
    def broken(*_: object) -> object:
        raise ZeroDivisionError("a rule's own bug")

    register_module_handler(Faulty, broken)
    first, second = trace_channel_graph(nn.Sequential(nn.Conv2d(3, 4, 1), Faulty(), nn.Conv2d(4, 2, 1))).spaces
    assert first.refusals == ["Faulty 1 could not be followed (ZeroDivisionError: a rule's own bug)"]
    assert second.refusals == ["reaches the network's output, whose shape would change"]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # as visformer's forward does in effect: an exception without a message
            raise ValueError
        return self.conv(x)


def test_a_model_torch_fx_cannot_trace_with_a_message_less_exception_is_refused_not_raised() -> None:
    (space,) = trace_channel_graph(Untraceable()).spaces
    assert space.refusals and space.refusals[0].startswith("torch.fx cannot trace Untraceable (")


@pytest.mark.parametrize("model", [ShuffleUnit, SplitUnit])
def test_the_defect_networks_trace_without_raising(model: type[nn.Module]) -> None:
    trace_channel_graph(model())
