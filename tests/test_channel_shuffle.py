"""Channel shuffles and splits (issue 23): ShuffleNetV2's streams followed position by position.

A shuffle (``view`` to (N, groups, C/groups, H, W), ``transpose``, ``view`` back) and a ``chunk`` move channels by
position; the graph follows each channel to the modules that read it, the activation mask holds its guarantee
there, and the cut keeps the network's own forward, placing each kept channel where the cut network's shuffles
take it to the same readers (zero channels where a route has a slot and no kept channel).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_channel_graph import check_masked_and_cut, half_of_every_space, space_of
from torch import Tensor, nn
from torchvision.models.shufflenetv2 import InvertedResidual, channel_shuffle

from pruneflow.compaction import CompactionError, compact
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.verify import randomize_norms
from pruneflow.compaction.while_training import swap_in
from pruneflow.graph import trace_channel_graph
from pruneflow.pruning.criteria import L1, select_by_route
from pruneflow.pruning.strategies import make_strategy
from pruneflow.pruning.telemetry import DriftTelemetry

STRATEGIES = ["activation", "weight", "gradient", "hard", "parametrize", "control"]


class ShuffleStage(nn.Module):
    """A stem and a stage of torchvision's own ShuffleNetV2 blocks: a stride-2 block concatenates and shuffles its
    two branches, each later block chunks the stream, runs one half and shuffles it back in; a 1×1 conv reads the
    stream at the end."""

    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(
            InvertedResidual(8, width, 2), *(InvertedResidual(width, width, 1) for _ in range(blocks))
        )
        self.head = nn.Sequential(nn.Conv2d(width, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.stage(self.stem(x))).mean([2, 3]))


class Shuffled(nn.Module):
    """Two convs concatenated and shuffled (``how``="shuffle"), or reshaped so that channels and a spatial dim mix
    ("mixed"), or split into groups summed together ("summed"), before conv ``c`` reads them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d({"shuffle": 8, "mixed": 4, "summed": 4}[how], 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        n, c, h, w = x.size()
        if self.how == "shuffle":
            x = channel_shuffle(x, 2)
        elif self.how == "mixed":
            x = x.view(n, c // 2, 2 * h, w)
        else:
            x = x.view(n, 2, c // 2, h, w).sum(1)
        return self.c(x)


def test_a_channel_shuffle_is_followed_position_by_position() -> None:
    graph = trace_channel_graph(Shuffled("shuffle"))
    # cat(a, b) shuffled in 2 groups: a's channel i lands at 2i, b's at 2i + 1
    assert [(c.name, c.at) for c in space_of(graph, "a").consumers] == [("c", (0, 2, 4, 6))]
    assert [(c.name, c.at) for c in space_of(graph, "b").consumers] == [("c", (1, 3, 5, 7))]
    assert space_of(graph, "a").prunable and space_of(graph, "b").prunable


@pytest.mark.parametrize("how", ["mixed", "summed"])
def test_a_reshape_that_mixes_channels_with_another_dim_refuses_their_spaces(how: str) -> None:
    graph = trace_channel_graph(Shuffled(how))
    for name in ("a", "b"):
        assert not space_of(graph, name).prunable, space_of(graph, name).refusals


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_shuffled_stream_masks_exactly_and_cuts_to_the_masked_function(strategy: str) -> None:
    """Random halves (not what a criterion keeps per route): the cut pads routes with zero channels, exactly."""
    graph = check_masked_and_cut(ShuffleStage(), (3, 16, 16), strategy)
    assert [space.name for space in graph.spaces if not space.prunable] == ["fc"]
    last = space_of(graph, "stage.3.branch2.5")  # the last block's output: read only by the head, in shuffled order
    assert [(c.name, c.at) for c in last.consumers] == [("head.0", tuple(range(1, 16, 2)))]


def test_the_criteria_keep_each_route_within_the_cut_networks_slots() -> None:
    routes = {("x",): (0, 1, 2, 3), ("y",): (4, 5), ("z",): (6, 7)}
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 5.0, 6.0])
    # proportional: 4 of 8 pruned as 2, 1, 1, the lowest scores of each route
    pruned = select_by_route(routes, scores, 4, torch.zeros(8, dtype=torch.bool))
    assert pruned.nonzero().flatten().tolist() == [2, 3, 4, 6]
    # the cut has slots x: 3, y: 1 and none on z: z is pruned whole, x keeps its best 3
    pruned = select_by_route(routes, scores, 4, torch.zeros(8, dtype=torch.bool), {("x",): 3, ("y",): 1, ("w",): 0})
    assert pruned.nonzero().flatten().tolist() == [3, 4, 6, 7]


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0"])
def test_half_of_every_shufflenet_space_by_l1_cuts_at_least_3x_the_flops_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.get_model(name, num_classes=10)).eval()
    images = torch.randn(2, 3, 64, 64)
    graph = trace_channel_graph(model)
    criterion, masking, masks = L1(), make_strategy("activation"), {}
    for space in graph.prunable:
        pruned = criterion.select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        masks.update((layer.name, pruned) for layer in space.producers)
        for layer in space.producers:
            masking.apply(layer, pruned)
    with torch.no_grad():
        masked = model(images)
        compaction = compact(model, masks)
        assert (compaction.model(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
    ratio = count_flops(model, images[:1]) / count_flops(compaction.model, images[:1])
    assert ratio >= 3.0, ratio
    # the stream of the 8-block stage is cut to half its width, as a criterion-kept share asks
    stage3 = compaction.model.stage3
    assert (
        stage3[7].branch2[5].out_channels
        == stage3[0].branch1[2].out_channels
        == model.stage3[7].branch2[5].out_channels // 2
    )


def test_a_cut_while_training_keeps_its_padding_channels_at_zero() -> None:
    torch.manual_seed(0)
    model = randomize_norms(ShuffleStage()).train()
    images = torch.randn(8, 3, 16, 16)
    masks = half_of_every_space(trace_channel_graph(model))  # random halves: the cut needs zero channels
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(images).square().mean().backward()
    optimizer.step()  # a momentum on every entry, the padding's source rows included
    compaction = compact(model, masks)
    assert compaction.padding, "random halves should need zero channels"
    swap_in(model, compaction, [optimizer])
    for _ in range(3):
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    modules = dict(model.named_modules())
    for name, (rows, _) in compaction.padding.items():
        module = modules[name]
        if rows is not None and len(rows):
            for tensor in module.parameters(recurse=False):
                assert tensor.detach().index_select(0, rows).abs().max() == 0, f"{name}'s padding rows moved"


@pytest.mark.parametrize(("strategy", "leaks"), [("hard", True), ("activation", False)])
def test_telemetry_measures_the_leak_where_a_shuffled_stream_is_read_at_its_positions(
    strategy: str, leaks: bool
) -> None:
    torch.manual_seed(0)
    model = randomize_norms(ShuffleNetPair()).train()
    graph = trace_channel_graph(model)
    space = space_of(graph, "first.stage.0.branch1.2")
    assert {point.name for point in space.points} == {"second.0.branch1.0", "second.0.branch1.1"}
    assert all(point.at for point in space.points)  # read reordered, at positions
    (layer,) = space.producers
    masking, mask = make_strategy(strategy), torch.arange(space.width) % 2 == 0
    masking.prepare(layer)
    telemetry = DriftTelemetry([layer], masking, dict(model.named_modules()))
    masking.apply(layer, mask)
    telemetry.on_pruned(layer, mask)
    telemetry.arm(True)
    model(torch.randn(4, 3, 16, 16))
    leak = telemetry.measure()["leak/activation_abs_mean"]
    assert leak > 0.01 if leaks else leak == 0  # β of the next stage's depthwise norm, unless masked there


class ShuffleNetPair(nn.Module):
    """A ``ShuffleStage`` followed by a stride-2 block, whose branch-1 depthwise conv and its norm read the whole
    shuffled stream: they carry each channel at its position, and are masked there."""

    def __init__(self) -> None:
        super().__init__()
        self.first = ShuffleStage(width=16, blocks=2)
        self.first.head = nn.Identity()
        self.first.fc = nn.Identity()
        self.second = nn.Sequential(InvertedResidual(16, 24, 2))
        self.fc = nn.Linear(24, 10)

    def forward(self, x: Tensor) -> Tensor:
        stream = self.first.stage(self.first.stem(x))
        return self.fc(self.second(stream).mean([2, 3]))


class ShuffledNorm(nn.Module):
    """Two convs shuffled together and chunked: the first half goes through a LayerNorm (channels last), the second
    to a conv. Each space has two routes, one through the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.norm, self.c, self.d = nn.LayerNorm(4), nn.Linear(4, 5), nn.Conv2d(4, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        first, second = channel_shuffle(torch.cat([self.a(x), self.b(x)], dim=1), 2).chunk(2, dim=1)
        return self.c(self.norm(first.permute(0, 2, 3, 1))).mean((1, 2)) + self.d(second).mean((2, 3))


def test_a_cut_that_would_put_a_zero_channel_under_a_layer_norm_is_refused_naming_it() -> None:
    model = ShuffledNorm()
    graph = trace_channel_graph(model)
    assert space_of(graph, "a").routes == {("c", "norm"): (0, 1), ("d",): (2, 3)}
    # a keeps only channels the conv reads: at half width the cut has a slot for it under the norm, left empty
    masks = {"a": torch.tensor([True, True, False, False]), "b": torch.tensor([False, False, True, True])}
    with pytest.raises(CompactionError, match="cannot cut norm: a LayerNorm reads a reordered space"):
        compact(model, masks)
    # what a criterion keeps per route cuts exactly
    masks = {"a": torch.tensor([True, False, True, False]), "b": torch.tensor([False, True, False, True])}
    images = torch.randn(2, 3, 4, 4)
    pruned = {name: masks[name] for name in ("a", "b")}
    masking = make_strategy("activation")
    for layer in graph.layers:
        if layer.name in pruned:
            masking.prepare(layer)
            masking.apply(layer, pruned[layer.name])
    with torch.no_grad():
        assert (compact(model, pruned).model(images) - model(images)).abs().max() <= 1e-5
