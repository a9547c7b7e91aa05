"""The channel graph on the networks people bring: torchvision's zoo, an MLP and a Conv1d net.

For each: which spaces are prunable and coupled, and — the guarantee, measured from outside — after
``activation`` masking of half of every prunable space (coupled groups at every producer), compaction
computes what the masked model computes, and the exported program loads with torch alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import lightning as L
import pytest
import torch
import torchvision
from helpers import COLUMNS_BUFFER, ConsumerInputProbe, DenseLayers, GroupedBottleneck, input_positions
from torch import Tensor, nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.ops import stochastic_depth

from pruneflow import ChannelPruning, ClassifierModule
from pruneflow.compaction import compact, export_compact
from pruneflow.compaction.verify import randomize_norms
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelGraph, ChannelSpace, Consumer, trace_channel_graph
from pruneflow.pruning.criteria import L1, Explicit, Random, channels_to_prune, select_per_head
from pruneflow.pruning.selection import select_spaces
from pruneflow.pruning.strategies import make_strategy
from pruneflow.pruning.telemetry import DriftTelemetry


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 10)
    )  # fmt: skip


def conv1d_net() -> nn.Module:
    """Conv1d → BN1d → depthwise Conv1d → BN1d, a residual addition, then pooling and a linear head."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.bn = nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8)
            self.dw, self.dw_bn = nn.Conv1d(8, 8, 3, padding=1, groups=8), nn.BatchNorm1d(8)
            self.pool, self.fc = nn.AdaptiveAvgPool1d(2), nn.Linear(16, 10)

        def forward(self, x: Tensor) -> Tensor:
            x = torch.relu(self.bn(self.stem(x)))
            x = x + torch.relu(self.dw_bn(self.dw(x)))
            return self.fc(torch.flatten(self.pool(x), 1))

    return Net()


def concat_net() -> nn.Module:
    """Two branches concatenated along channels and read by one conv: each space at its own offset."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.a_bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.b, self.b_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c, self.c_bn = nn.Conv2d(10, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 4, 10)

        def forward(self, x: Tensor) -> Tensor:
            x = torch.cat([torch.relu(self.a_bn(self.a(x))), torch.relu(self.b_bn(self.b(x)))], dim=1)
            x = torch.relu(self.c_bn(self.c(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))

    return Net()


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, num_classes=10)


# name → (builder, input shape, (spaces, prunable, coupled prunable))
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, int, int]]] = {
    "resnet18": (torchvision_model("resnet18"), (3, 32, 32), (13, 12, 4)),
    "resnet50": (torchvision_model("resnet50"), (3, 32, 32), (38, 37, 4)),
    "mobilenet_v2": (torchvision_model("mobilenet_v2"), (3, 32, 32), (26, 25, 5)),
    "mobilenet_v3_small": (torchvision_model("mobilenet_v3_small"), (3, 32, 32), (28, 27, 13)),
    "densenet121": (torchvision_model("densenet121"), (3, 32, 32), (121, 120, 0)),
    "vgg11_bn": (torchvision_model("vgg11_bn"), (3, 32, 32), (11, 10, 0)),
    # channel shuffles and chunks followed position by position; only the classifier is refused
    "shufflenet_v2_x0_5": (torchvision_model("shufflenet_v2_x0_5"), (3, 32, 32), (38, 37, 0)),
    "efficientnet_b0": (torchvision_model("efficientnet_b0"), (3, 32, 32), (41, 40, 21)),  # stochastic depth
    "regnet_y_400mf": (torchvision_model("regnet_y_400mf"), (3, 32, 32), (54, 53, 20)),  # grouped convs
    "mlp": (mlp, (1, 8, 8), (3, 2, 0)),
    "concat": (concat_net, (3, 8, 8), (4, 3, 0)),
    "conv1d": (conv1d_net, (2, 16), (2, 1, 0)),  # the addition joins a space with itself
    "tiny_convnext": (lambda: TinyConvNeXt(), (3, 16, 16), (6, 5, 2)),  # LayerNorms, permutes, layer scales
}


def space_of(graph: ChannelGraph, name: str) -> ChannelSpace:
    return next(space for space in graph.spaces if name in space.names)


@pytest.mark.parametrize("name", MODELS)
def test_prunable_and_coupled_space_counts(name: str) -> None:
    build, _, (spaces, prunable, coupled) = MODELS[name]
    graph = trace_channel_graph(build())
    assert (len(graph.spaces), len(graph.prunable), sum(s.coupled for s in graph.prunable)) == (
        spaces,
        prunable,
        coupled,
    )
    # The classifier writes the output: never prunable, and the reason says so.
    assert any("reaches the network's output" in reason for space in graph.spaces for reason in space.refusals)


def test_resnet_residual_spaces_are_coupled_groups_of_every_producer() -> None:
    resnet18 = trace_channel_graph(torchvision_model("resnet18")())
    assert space_of(resnet18, "conv1").names == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    stage4 = space_of(resnet18, "layer4.0.downsample.0")
    assert stage4.coupled and stage4.names == ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"]
    assert [c.name for c in stage4.consumers] == ["layer4.1.conv1", "fc"]
    inner = space_of(resnet18, "layer2.0.conv1")
    assert not inner.coupled and inner.names == ["layer2.0.conv1"] and inner.producers[0].norm_name == "layer2.0.bn1"
    resnet50 = trace_channel_graph(torchvision_model("resnet50")())
    assert "layer3.0.downsample.0" in space_of(resnet50, "layer3.5.conv3").names


def test_depthwise_conv_and_its_norm_belong_to_the_space_they_read() -> None:
    graph = trace_channel_graph(torchvision_model("mobilenet_v2")())
    space = space_of(graph, "features.2.conv.0.0")
    assert space.names == ["features.2.conv.0.0", "features.2.conv.1.0"] and not space.coupled
    depthwise = space.producers[1]
    assert depthwise.depthwise and depthwise.norm_name == "features.2.conv.1.1"
    assert [c.name for c in space.consumers] == ["features.2.conv.2"]


def test_squeeze_excitation_scale_couples_its_producer_with_the_scaled_space() -> None:
    graph = trace_channel_graph(torchvision_model("mobilenet_v3_small")())
    space = space_of(graph, "features.4.block.2.fc2")
    assert space.names == ["features.4.block.0.0", "features.4.block.1.0", "features.4.block.2.fc2"]
    assert space.coupled and [c.name for c in space.consumers] == ["features.4.block.2.fc1", "features.4.block.3.0"]
    assert space_of(graph, "features.4.block.2.fc1").prunable  # the SE bottleneck is a plain space


def test_concatenation_and_shuffles_prune_what_is_safe_and_refuse_the_rest_by_name(caplog) -> None:
    densenet = trace_channel_graph(torchvision_model("densenet121")())
    assert space_of(densenet, "features.denseblock1.denselayer1.conv1").prunable
    grown = space_of(densenet, "features.denseblock1.denselayer1.conv2")  # masked again at every later norm1
    assert grown.prunable and grown.points[0].name == "features.denseblock1.denselayer2.norm1"
    assert grown.points[0].offset == 64 and grown.points[-1].name == "features.transition1.norm"
    shufflenet = trace_channel_graph(torchvision_model("shufflenet_v2_x0_5")())
    branch = space_of(shufflenet, "stage3.1.branch2.0")
    assert branch.prunable and branch.names == ["stage3.1.branch2.0", "stage3.1.branch2.3"]
    shuffled = space_of(shufflenet, "stage3.1.branch2.5")  # through the stage's shuffles and chunks
    assert shuffled.prunable and not shuffled.coupled
    readers = [consumer.name for consumer in shuffled.consumers] + [point.name for point in shuffled.points]
    assert readers == [*(f"stage3.{block}.branch2.0" for block in range(2, 7)), "stage4.0.branch1.2",
                       "stage4.0.branch2.0", "stage4.0.branch1.0", "stage4.0.branch1.1"]  # fmt: skip
    # each channel is read by one block's branch, or at the stage's end by the next stage's first block
    routes = {route: len(channels) for route, channels in shuffled.routes.items()}
    assert routes == {
        ("stage3.2.branch2.0",): 24, ("stage3.3.branch2.0",): 12, ("stage3.4.branch2.0",): 6,
        ("stage3.5.branch2.0",): 3, ("stage3.6.branch2.0",): 2,
        ("stage4.0.branch1.0", "stage4.0.branch1.1", "stage4.0.branch1.2", "stage4.0.branch2.0"): 1,
    }  # fmt: skip


def test_spaces_reach_a_reader_through_a_concatenation_at_their_offsets() -> None:
    graph = trace_channel_graph(concat_net())
    assert space_of(graph, "a").consumers == [Consumer("c", "conv", 1, 0)]
    assert space_of(graph, "b").consumers == [Consumer("c", "conv", 1, 6)]
    assert space_of(graph, "c").consumers == [Consumer("fc", "linear", 4, 0)]
    assert Consumer("c", "conv", 1, 6).columns(torch.tensor([1])).tolist() == [7]


def test_a_coupled_member_named_by_a_glob_selects_its_group_and_the_log_says_so(caplog) -> None:
    graph = trace_channel_graph(torchvision_model("resnet18")())
    assert all(not space.coupled for space in select_spaces(graph.spaces, None))
    assert sum(space.coupled for space in select_spaces(graph.spaces, None, groups=True)) == 4
    with caplog.at_level(logging.INFO, logger="pruneflow.pruning.selection"):
        (space,) = select_spaces(graph.spaces, ["layer1.1.conv2"], groups=True)
    assert space.names == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert "names layer1.1.conv2: pruning its whole group conv1, layer1.0.conv2, layer1.1.conv2" in caplog.text
    with pytest.raises(ConfigError, match=r"selects conv1, which cannot be pruned: .*mask\.groups=false"):
        select_spaces(graph.spaces, ["layer1.1.conv2"], groups=False)


def half_of_every_space(graph: ChannelGraph) -> dict[str, Tensor]:
    """Half the channels of every prunable space, the same channels at every producer of the space (and the
    same positions in every group of a grouped conv's space)."""
    generator = torch.Generator().manual_seed(1)
    masks = {}
    for space in graph.prunable:
        # whole heads only, or q/k positions by whole frequencies of a rope shared by several attentions (the same
        # in each): as the criteria select them, half of them or as many as the share their stream loses makes
        if space.whole_heads or space.rope is not None:
            masks.update((name, Random(1).select(space, 0.5, torch.zeros(space.width, dtype=torch.bool)))
                         for name in space.names)  # fmt: skip
            continue
        if space.heads > 1:  # an attention's q, k, v rows: half of each head's, the same from q and k (and v where
            # its space is cut in groups of q, k and v, as the criteria select)
            alike = space.parts > 1 and space.groups == space.parts
            pruned = select_per_head(torch.rand(space.width, generator=generator), space.heads,
                                     channels_to_prune(space.width // (space.parts * space.heads), 0.5),
                                     torch.zeros(space.width, dtype=torch.bool), space.parts, alike=alike)  # fmt: skip
            masks.update((name, pruned) for name in space.names)
            continue
        if space.multiple > 1:  # read by attentions: half of each head's share, the same positions in every group
            unit, block = math.lcm(space.multiple, space.groups), space.width // space.groups
            count = unit * channels_to_prune(space.width // unit, 0.5) // space.groups  # in each group
            mask = torch.zeros(block, dtype=torch.bool)
            mask[torch.randperm(block, generator=generator)[:count]] = True
            masks.update((name, mask.repeat(space.groups)) for name in space.names)
            continue
        block = space.width // space.groups
        mask = torch.zeros(block, dtype=torch.bool)
        mask[torch.randperm(block, generator=generator)[: channels_to_prune(block, 0.5)]] = True
        masks.update((name, mask.repeat(space.groups)) for name in space.names)
    return masks


@pytest.mark.parametrize("name", MODELS)
def test_half_of_every_space_masked_compacts_to_the_same_function_and_exports(name: str, tmp_path) -> None:
    build, input_shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomize_norms(build())
    images = torch.randn(2, *input_shape)
    dense = model(images)
    graph = trace_channel_graph(model)
    masks = half_of_every_space(graph)
    strategy = make_strategy("activation")
    for layer in graph.layers:
        if layer.name in masks:
            strategy.apply(layer, masks[layer.name])
    masked = model(images)
    assert (masked - dense).abs().max() > 1e-3  # the masks matter

    compaction = compact(model, masks)
    logits = compaction.model(images)

    assert (logits - masked).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(1), masked.argmax(1))
    before, after = compaction.channels
    assert after < before and before == sum(space.width for space in graph.prunable)
    paths = export_compact(compaction, input_shape, tmp_path)
    program = torch.export.load(paths["program"]).module()  # torch alone: no pruneflow, no model code
    assert (program(images) - masked).abs().max() <= 1e-4


class Refused(nn.Module):
    """conv ``a`` → ``between`` → conv ``b``: whatever stands between decides whether ``a`` can be pruned."""

    def __init__(self, between: str) -> None:
        super().__init__()
        self.between = between
        self.a = nn.Conv2d(3, 4, 1)
        self.norm = nn.GroupNorm(2, 4)
        self.b = nn.Conv2d(4, 4, 1, groups=2 if between == "grouped" else 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        if self.between == "constant":
            x = x + 1
        elif self.between == "sigmoid":
            x = torch.sigmoid(x)
        elif self.between == "groupnorm":
            x = self.norm(x)
        elif self.between == "slice":
            x = torch.cat([x[:, :2], x[:, 2:]], dim=1)
        return self.b(x)


@pytest.mark.parametrize(
    ("between", "reason"),
    [
        ("constant", "add() at add turns a masked channel's 0 into f(0) ≠ 0 before b reads it"),
        ("sigmoid", "sigmoid() at sigmoid turns a masked channel's 0 into f(0) ≠ 0 before b reads it"),
        ("slice", "reaches getitem() at getitem, whose effect on channels is not understood"),
    ],
)
def test_what_would_revive_or_reshuffle_a_channel_refuses_its_space_naming_it(between: str, reason: str) -> None:
    space = space_of(trace_channel_graph(Refused(between)), "a")
    assert not space.prunable and any(reason in refusal for refusal in space.refusals), space.refusals


def test_a_group_norm_between_prunes_the_space_in_whole_groups() -> None:
    """It refused the space ("2 group(s) of 4 channels"); whole groups keep every kept group's statistics."""
    space = space_of(trace_channel_graph(Refused("groupnorm")), "a")
    assert space.prunable and space.block == 2, space.refusals


# -- issue 21: what only looks like a channel-major flatten, and weights read elsewhere -------------
class PartialFlatten(nn.Module):
    """conv ``a`` (4 channels of 8×8) → a reduction or flatten that keeps a spatial dim → linear ``b`` over
    the last dim (8 features, a multiple of the 4 channels, though not a channel-major layout)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.flat = nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(1, 2)
        self.b, self.head = nn.Linear(8, 5), nn.Linear(4 * 8 * 5 if how == "mean" else 32 * 5, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        if self.how == "torch.flatten":
            x = torch.flatten(x, 1, 2)
        elif self.how == "nn.Flatten":
            x = self.flat(x)
        else:
            x = x.mean(-1)
        return self.head(torch.flatten(self.b(x), 1))


@pytest.mark.parametrize("how", ["torch.flatten", "nn.Flatten", "mean"])
def test_a_partial_flatten_or_reduction_is_not_read_as_channel_major(how: str) -> None:
    model = PartialFlatten(how)
    space = space_of(trace_channel_graph(model), "a")
    assert not space.prunable and not any(c.name == "b" for c in space.consumers), space.consumers
    with pytest.raises(ConfigError, match="cannot cut channels of a"):
        compact(model, {"a": [0, 1]})


class SpatialFlatten(nn.Module):
    """``x.flatten(2).mean(-1)``: the spatial dims flattened, then reduced: every channel keeps its index."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.a_bn(self.a(x))).flatten(2).mean(-1))


def test_a_flatten_of_the_spatial_dims_keeps_the_channels() -> None:
    graph = check_masked_and_cut(SpatialFlatten(), (3, 6, 6), "activation")
    assert space_of(graph, "a").consumers == [Consumer("fc", "linear")]


class SharedWeight(nn.Module):
    """``conv``'s weight read a second time by ``F.conv2d`` (a ``get_attr``), or ``b`` tied to ``a``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head_a, self.head_b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        if how == "tied":
            self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        if self.how == "functional":
            y = nn.functional.conv2d(x, self.a.weight, dilation=2, padding=2)
            return self.head_a(torch.relu(self.a(x))) + self.head_b(y).mean()
        return self.head_a(torch.relu(self.a(torch.relu(self.b(x)))))


@pytest.mark.parametrize("how", ["functional", "tied"])
def test_a_weight_read_anywhere_else_leaves_its_spaces_unprunable_said_once(how: str, caplog) -> None:
    model = SharedWeight(how)
    with caplog.at_level(logging.INFO, logger="pruneflow.graph"):
        graph = trace_channel_graph(model)
    shared = ["a", "b"] if how == "tied" else ["a"]
    for name in shared:
        assert not space_of(graph, name).prunable, (name, space_of(graph, name).refusals)
    message = "a.weight is also read by conv2d() at conv2d" if how == "functional" else "b.weight is a.weight"
    assert caplog.text.count(message) == 1, caplog.text
    with pytest.raises(ConfigError, match="cannot cut channels of"):
        compact(model, {name: [0] for name in shared})


# -- issue 23: new kinds of space, each with the activation-mask guarantee measured from outside ----
def check_masked_and_cut(model: nn.Module, input_shape: tuple[int, ...], strategy: str) -> ChannelGraph:
    """Mask half of every prunable space with ``strategy``; for ``activation`` check from outside the mask
    that every consumer receives exactly 0 on a masked channel's columns (no leak), every producer's pruned
    rows get exactly 0 gradient, and the cut network computes what the masked one does. Every other
    strategy must apply, train a step and compact."""
    torch.manual_seed(0)
    model = randomize_norms(model).train()  # traced in training mode, as the callback does at setup
    images = torch.randn(4, *input_shape)
    graph = trace_channel_graph(model)
    masks = half_of_every_space(graph)
    masking = make_strategy(strategy)
    for layer in graph.layers:
        if layer.name in masks:
            masking.prepare(layer)
            masking.apply(layer, masks[layer.name])
    modules = dict(model.named_modules())
    received: dict[str, Tensor] = {}
    # a Swin attention's qkv is never called: it reads the attention's input (its proj reads inside it, unseen)
    units = {layer.name: layer.unit_name for layer in graph.layers if layer.unit_name is not None}
    handles = [
        modules[units.get(consumer.name, consumer.name)].register_forward_pre_hook(
            lambda module, inputs, name=consumer.name: received.__setitem__(name, inputs[0].detach())
        )
        for space in graph.prunable
        for consumer in space.consumers
        if consumer.name.endswith(".qkv") or consumer.name not in units
    ]
    model.train()
    model(images).square().sum().backward()
    for handle in handles:
        handle.remove()
    model.eval()
    with torch.no_grad():
        masked = model(images)
    compaction = compact(model, masks)
    if strategy != "activation":
        return graph
    for space in graph.prunable:
        pruned = masks[space.name].nonzero().flatten()
        for consumer in (c for c in space.consumers if c.name in received):
            dim = -1 if consumer.kind == "linear" else 1  # a linear layer reads its features on the last dim
            leak = received[consumer.name].index_select(dim, input_positions(consumer, pruned))
            assert leak.abs().sum() == 0, f"{consumer.name} receives {space.name}'s masked channels"
        for layer in space.producers:
            assert layer.producer.weight.grad[pruned].abs().max() == 0, f"{layer.name}'s pruned rows get a gradient"
    with torch.no_grad():
        assert (compaction.model(images) - masked).abs().max() <= 1e-4
    return graph


@pytest.mark.parametrize("strategy", ["activation", "weight", "gradient", "hard", "parametrize", "control"])
def test_a_norm_after_a_concatenation_masks_each_space_at_its_offset(strategy: str) -> None:
    graph = check_masked_and_cut(DenseLayers(), (3, 6, 6), strategy)
    assert {space.name for space in graph.prunable} == {"stem", "conv1", "conv2"}
    points = [(point.name, point.offset) for point in space_of(graph, "conv1").points]
    assert points == [("norm2", 4), ("norm3", 4)]


@pytest.mark.parametrize(("strategy", "leaks"), [("hard", True), ("activation", False)])
def test_telemetry_measures_the_leak_at_a_norm_after_a_concatenation(strategy: str, leaks: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(DenseLayers()).train()
    (layer,) = space_of(trace_channel_graph(model), "conv1").producers  # no norm of its own: zero at conv1
    masking, mask = make_strategy(strategy), torch.tensor([True, False, True])
    masking.prepare(layer)
    telemetry = DriftTelemetry([layer], masking, dict(model.named_modules()))
    masking.apply(layer, mask)
    telemetry.on_pruned(layer, mask)
    telemetry.arm(True)
    model(torch.randn(4, 3, 6, 6))
    leak = telemetry.measure()["leak/activation_abs_mean"]
    assert leak > 0.1 if leaks else leak == 0  # β of norm2 and norm3 at offset 4, unless masked there


class StochasticResidual(nn.Module):
    """EfficientNet's and ConvNeXt's residual branch dropped per sample (``StochasticDepth``, and its
    function), then a head that reads the batch size from ``x.shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.a, self.a_bn = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)
        self.b, self.b_bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.drop, self.fc = torchvision.ops.StochasticDepth(0.5, "row"), nn.Linear(6 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        branch = self.b_bn(self.b(torch.relu(self.a_bn(self.a(x)))))
        x = x + self.drop(branch)
        x = x + stochastic_depth(branch, 0.5, "batch", self.training)
        x = nn.functional.adaptive_avg_pool2d(x, 2)
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("strategy", ["activation", "weight", "gradient", "hard", "parametrize", "control"])
def test_stochastic_depth_and_shape_reads_keep_a_space_prunable(strategy: str) -> None:
    graph = check_masked_and_cut(StochasticResidual(), (3, 6, 6), strategy)
    assert space_of(graph, "stem").names == ["stem", "b"] and {s.name for s in graph.prunable} == {"stem", "a"}
    assert space_of(graph, "stem").consumers == [Consumer("a", "conv"), Consumer("fc", "linear", 4)]


@pytest.mark.parametrize("strategy", ["activation", "weight", "gradient", "hard", "parametrize", "control"])
def test_a_grouped_conv_space_is_cut_at_the_same_positions_in_every_group(strategy: str) -> None:
    graph = check_masked_and_cut(GroupedBottleneck(), (3, 6, 6), strategy)
    assert {space.name: space.groups for space in graph.prunable} == {"stem": 1, "a": 4, "b": 4}
    assert space_of(graph, "a").consumers == [Consumer("b", "grouped", block=2)]
    compaction = compact(GroupedBottleneck(), {"a": [1, 3, 5, 7], "b": [0, 3, 6, 9]})
    assert (compaction.model.b.groups, *compaction.model.b.weight.shape[:2]) == (4, 8, 1)


@pytest.mark.parametrize(("strategy", "leaks"), [("activation", False), ("hard", True)])
def test_a_grouped_conv_receives_exactly_zero_on_the_pruned_channels_of_its_whole_input(
    strategy: str, leaks: bool
) -> None:
    """Measured by the probe, outside the mask, at the grouped conv's input (8 channels, 2 per group):
    ``hard`` leaks a_bn's β there, ``activation`` does not."""
    torch.manual_seed(0)
    images = torch.randn(48, 3, 6, 6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(48) % 5), batch_size=8)
    pruning = ChannelPruning(strategy=strategy, amount=0.5, at_step=2, groups=True)
    probe = ConsumerInputProbe()
    trainer = L.Trainer(max_epochs=1, callbacks=[pruning, probe], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    network = randomize_norms(GroupedBottleneck())  # β ≠ 0, so a leaking mask shows
    trainer.fit(ClassifierModule(network, lambda params: torch.optim.SGD(params, lr=0.1), num_classes=5), loader)
    assert probe.forwards_after_pruning == 4
    pruned = pruning.pruned["a"]
    assert pruned.view(4, 2).sum(1).tolist() == [1] * 4  # the same position cut in every group
    assert torch.equal(getattr(network.b, COLUMNS_BUFFER), pruned.float())  # the input channels, not columns
    assert probe.received()["b"] > 0.01 if leaks else probe.received()["b"] == 0


def test_a_grouped_space_scored_per_position_and_cut_unevenly_is_refused() -> None:
    space = space_of(trace_channel_graph(GroupedBottleneck()), "b")
    mask = L1().select(space, 0.5, torch.zeros(12, dtype=torch.bool))
    assert mask.view(4, 3).sum(1).tolist() == [1] * 4 and (mask.view(4, 3) == mask[:3]).all()
    with pytest.raises(ConfigError, match=r"cannot cut channels \[0, 1\] of b: a grouped conv .* in 4 groups of 3"):
        compact(GroupedBottleneck(), {"b": [0, 1]})
    with pytest.raises(ConfigError, match=r"mask.channels\[b\] must name the same positions in each of its 4 groups"):
        Explicit({"b": [0, 1]}).check([space])
    Explicit({"b": [2, 5, 8, 11]}).check([space])


# -- issue 23, ConvNeXt: channels moved by permute, LayerNorms over channels, per-channel layer scales -------
class TinyConvNeXt(nn.Module):
    """ConvNeXt's patterns with torchvision's own modules: a stride-2 conv stem with a ``LayerNorm2d``, two
    ``CNBlock``s (depthwise conv → Permute → LayerNorm → Linear → GELU → Linear → Permute, times the
    ``layer_scale`` parameter, stochastic depth, plus the input), a ``LayerNorm2d`` then a stride-2 conv, a
    block at the new width, and the head avgpool → ``LayerNorm2d`` → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.blocks = nn.Sequential(CNBlock(8, 1.0, 0.0), CNBlock(8, 1.0, 0.0))
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 12, 2, stride=2))
        self.block = CNBlock(12, 1.0, 0.0)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), LayerNorm2d(12), nn.Flatten(1), nn.Linear(12, 5))
        with torch.no_grad():  # a layer scale cut at the wrong entries must show
            for block in (*self.blocks, self.block):
                block.layer_scale.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.down(self.blocks(self.stem(x)))))


def test_a_convnext_residual_stream_is_one_coupled_space_with_its_layer_norms_and_layer_scales() -> None:
    graph = trace_channel_graph(TinyConvNeXt())
    stream = space_of(graph, "stem.0")
    assert stream.prunable and stream.coupled, stream.refusals
    assert stream.names == ["stem.0", "blocks.0.block.0", "blocks.0.block.5", "blocks.1.block.0", "blocks.1.block.5"]
    assert stream.producers[0].norm_name == "stem.1"  # the LayerNorm2d right after the stem conv is its norm
    assert [(point.name, point.shape) for point in stream.points] == [
        ("blocks.0.block.2", (8,)), ("blocks.1.block.2", (8,)), ("down.0", (1, 8, 1, 1))
    ]  # fmt: skip
    assert [(scale.name, scale.dim) for scale in stream.scales] == [
        ("blocks.0.layer_scale", 0), ("blocks.1.layer_scale", 0)
    ]  # fmt: skip
    assert [(c.name, c.kind) for c in stream.consumers] == [
        ("blocks.0.block.3", "linear"), ("blocks.1.block.3", "linear"), ("down.1", "conv")
    ]  # fmt: skip
    assert {space.name for space in graph.prunable} == {
        "stem.0", "blocks.0.block.3", "blocks.1.block.3", "down.1", "block.block.3"
    }  # fmt: skip
    assert [point.name for point in space_of(graph, "down.1").points] == ["block.block.2", "head.1"]


@pytest.mark.parametrize("strategy", ["activation", "weight", "gradient", "hard", "parametrize", "control"])
def test_convnext_layer_norms_and_layer_scales_mask_exactly_and_cut_to_the_masked_function(strategy: str) -> None:
    graph = check_masked_and_cut(TinyConvNeXt(), (3, 16, 16), strategy)
    assert len(graph.prunable) == 5 and sum(space.coupled for space in graph.prunable) == 2


def test_a_convnext_cut_slices_layer_norms_and_layer_scales_with_their_channels() -> None:
    model = TinyConvNeXt()
    graph = trace_channel_graph(model)
    masks = half_of_every_space(graph)
    kept = (~masks["stem.0"]).nonzero().flatten()
    compaction = compact(model, masks)
    block = compaction.model.blocks[0]
    assert torch.equal(block.layer_scale, model.blocks[0].layer_scale[kept])
    assert block.block[2].normalized_shape == (4,) and torch.equal(
        block.block[2].bias, model.blocks[0].block[2].bias[kept]
    )
    assert compaction.model.stem[1].normalized_shape == (4,) and compaction.model.head[1].normalized_shape == (6,)
    assert compaction.sizes["blocks.0.layer_scale"] == {"channels": 4, "dim": 0}
    assert compaction.sizes["stem.1"] == {"normalized_shape": 4}


class ChannelsLastBranch(nn.Module):
    """Channels moved by ``Tensor.permute`` and ``torch.permute``: a conv with its ``LayerNorm2d``; in
    channels-last a linear layer with its own ``nn.LayerNorm`` and a (C,) per-channel scale; back to
    channels-first, added to the conv's output, read by a conv and a spatial mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv_norm = nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8)
        self.fc, self.fc_norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head_conv, self.out = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_norm(self.conv(x))
        y = self.gamma * nn.functional.gelu(self.fc_norm(self.fc(x.permute(0, 2, 3, 1))))
        x = x + torch.permute(y, (0, 3, 1, 2))
        return self.out(torch.relu(self.head_conv(x)).mean((2, 3)))


@pytest.mark.parametrize("strategy", ["activation", "hard"])
def test_layer_norms_right_after_their_producers_are_their_channel_points(strategy: str) -> None:
    graph = check_masked_and_cut(ChannelsLastBranch(), (3, 6, 6), strategy)
    space = space_of(graph, "conv")
    assert space.prunable and space.names == ["conv", "fc"], space.refusals
    assert [layer.norm_name for layer in space.producers] == ["conv_norm", "fc_norm"]
    assert [(scale.name, scale.dim) for scale in space.scales] == [("gamma", 0)]
    assert space.consumers == [Consumer("fc", "linear"), Consumer("head_conv", "conv")]


class SubclassedLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass: its forward may compute anything, so the graph does not guess."""


class ChannelsMisplaced(nn.Module):
    """conv ``a`` (4 channels of 4×4) → something that reads or moves its channels along another dim → ``b``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)
        self.norm = SubclassedLayerNorm(4) if how == "layer norm subclass" else nn.LayerNorm((4, 4))
        self.scale = nn.Parameter(torch.rand(1, 1, 4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(x)
        if self.how == "permute to dim 2":
            x = x.permute(0, 2, 1, 3)
        elif self.how == "scale along the width":
            x = (x * self.scale).permute(0, 2, 3, 1)
        elif self.how == "layer norm subclass":
            x = self.norm(x.permute(0, 2, 3, 1))
        else:
            x = self.norm(x)  # over (H, W)
        return self.b(x).flatten(1)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("permute to dim 2", ".permute() at permute moves them to dim 2: no reader there"),
        ("scale along the width", "mul() at mul combines them with a tensor outside the channel graph"),
        ("layer norm subclass", "reaches layer_norm() at layer_norm, whose effect on channels is not understood"),
        ("layer norm over two dims", "LayerNorm norm reads them among other channels and it normalises across more"),
    ],
)
def test_channels_read_or_moved_along_another_dim_refuse_their_space_naming_why(how: str, reason: str) -> None:
    space = space_of(trace_channel_graph(ChannelsMisplaced(how)), "a")
    assert not space.prunable and any(reason in refusal for refusal in space.refusals), space.refusals


@pytest.mark.parametrize(("strategy", "leaks"), [("hard", True), ("activation", False)])
def test_telemetry_measures_the_leak_at_a_layer_norm_reading_the_residual_stream(strategy: str, leaks: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(TinyConvNeXt()).train()
    layers = space_of(trace_channel_graph(model), "stem.0").producers
    masking, mask = make_strategy(strategy), torch.tensor([True, False] * 4)
    for layer in layers:
        masking.prepare(layer)
    telemetry = DriftTelemetry(layers, masking, dict(model.named_modules()))
    for layer in layers:
        masking.apply(layer, mask)
        telemetry.on_pruned(layer, mask)
    telemetry.arm(True)
    model(torch.randn(4, 3, 16, 16))
    metrics = telemetry.measure()
    # the dwconv has no norm: its leak is the LayerNorm's output after it (β, unless masked there)
    leak = metrics["leak/activation_abs_mean/blocks.0.block.0"]
    assert leak > 0.1 if leaks else leak == 0
