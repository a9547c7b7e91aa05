"""Gates that multiply two parts of one layer's rows (a GLU MLP, gMLP's spatial gating unit), linear layers over
the tokens of each channel (gMLP, MLP-Mixer), and grouped convs with a channel multiplier (FastViT, PiT): each on
the smallest module that shows it (seconds), half of every prunable space masked with ``activation`` and cut, the
cut network computing the masked one."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph
from pruneflow.graph.records import ChannelGraph, ChannelSpace

timm = pytest.importorskip("timm")


def space_of(graph: ChannelGraph, name: str) -> ChannelSpace:
    return next(space for space in graph.spaces if name in space.names)


def assert_cut_computes_the_masked(model: nn.Module, images: Tensor) -> None:
    """Every parameter random (timm starts some at 0 or 1, where a wrong cut could hide), half of every space masked
    and cut: the cut's logits are the masked network's, to a tolerance relative to their scale."""
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    scale = masked.abs().max().item()
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * scale), (cut - masked).abs().max() / scale


class GluBlock(nn.Module):
    """A gated MLP as GLU, SwiGLU and GeGLU write it in one layer: ``a, b = fc1(x).chunk(2, -1); fc2(act(a) * b)``,
    on a residual stream."""

    def __init__(self, width: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Linear(5, width), nn.Linear(width, 2 * hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        a, b = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(nn.functional.silu(a) * b)
        return self.head(x.mean(1))


def test_a_glu_pairs_its_layers_rows_and_cuts_them_in_pairs() -> None:
    """It was refused: ``a * b`` joins rows i and hidden + i of ``fc1``, which no space lined up."""
    graph = trace_channel_graph(GluBlock())
    gate = space_of(graph, "fc1")
    assert gate.prunable and gate.groups == 2 and not gate.reordered, gate.refusals
    assert_cut_computes_the_masked(GluBlock(), torch.randn(4, 6, 5))


def tiny_gmlp(block: str = "gmlp") -> nn.Module:
    from timm.layers import GatedMlp, Mlp
    from timm.models.mlp_mixer import MixerBlock, MlpMixer, SpatialGatingBlock

    layers = {"gmlp": (SpatialGatingBlock, GatedMlp, 6), "mixer": (MixerBlock, Mlp, (0.5, 4))}
    block_layer, mlp_layer, ratio = layers[block]
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=16, mlp_ratio=ratio,
                    block_layer=block_layer, mlp_layer=mlp_layer)  # fmt: skip


def test_gmlps_spatial_gating_unit_is_cut_in_pairs_through_its_token_linear() -> None:
    """gMLP: ``u, v = x.chunk(2, -1); u * proj(norm(v).transpose(-1, -2)).transpose(-1, -2)``. ``proj`` mixes the
    tokens of each channel on its own (read along another dim than the channels, it was refused), and ``u``'s channel
    i meets ``v``'s channel i: ``fc1``'s rows i and C + i, cut in pairs."""
    graph = trace_channel_graph(tiny_gmlp())
    gate = space_of(graph, "blocks.0.mlp_channels.fc1")
    assert gate.prunable and gate.groups == 2, gate.refusals
    assert not any("gate.proj" in name for space in graph.spaces for name in space.names)  # positions, not channels
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert_cut_computes_the_masked(tiny_gmlp(), torch.randn(2, 3, 32, 32))


def test_mlp_mixers_stream_is_followed_through_its_token_mlp() -> None:
    """MLP-Mixer's token MLP (``fc1``, ``fc2`` over the tokens of ``norm1(x).transpose(1, 2)``) carries each
    channel on its own: the stream it is added to is one space, cut exactly (its biases revive a masked channel of
    the stream, which only LayerNorms, recomputed over the kept channels, read)."""
    graph = trace_channel_graph(tiny_gmlp("mixer"))
    assert space_of(graph, "stem.proj").prunable, space_of(graph, "stem.proj").refusals
    assert_cut_computes_the_masked(tiny_gmlp("mixer"), torch.randn(2, 3, 32, 32))


class MultipliedChannels(nn.Module):
    """Two depthwise convs with a channel multiplier of 2 in a chain (FastViT's downsampling, PiT's pooling: groups =
    in channels, out = 2 · in), the first beside a second such conv it is added to, with a layer scale on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.large = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8))
        self.small = nn.Sequential(nn.Conv2d(4, 8, 1, groups=4), nn.BatchNorm2d(8))
        self.scale = nn.Parameter(torch.rand(8, 1, 1))
        self.again = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.mix, self.head = nn.Conv2d(16, 6, 1), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.relu(self.large(x) + self.small(x)) * self.scale
        x = self.mix(torch.relu(self.again(x)))
        return self.head(x.mean((2, 3)))


def test_a_depthwise_conv_with_a_channel_multiplier_cuts_each_input_channel_with_its_outputs() -> None:
    """It was refused ("joins a space cut in 4 groups with one cut in 8"): output channels 2c and 2c + 1 read input
    channel c alone, so the chain's spaces are one, the stem's, cut with 2 and 4 entries per channel after it."""
    graph = trace_channel_graph(MultipliedChannels())
    stem = space_of(graph, "stem.0")
    assert stem.prunable, stem.refusals
    assert {(point.name, point.per_channel) for point in stem.points} >= {("large.0", 2), ("small.1", 2), ("again", 4)}
    assert [(consumer.name, consumer.features_per_channel) for consumer in stem.consumers] == [("mix", 4)]
    assert_cut_computes_the_masked(MultipliedChannels(), torch.randn(2, 3, 8, 8))


def test_pits_pooling_convs_are_cut_with_the_stream_they_read() -> None:
    """PiT's ``ConvHeadPooling``: a multiplier conv on the map, a linear layer on the class token, each stage's
    stream written at twice the width of the one before: one space across the stages (the second pooling conv reading
    the first's output in 16 groups refused it: "joins a space cut in 8 groups with one cut in 16")."""
    from timm.models.pit import PoolingVisionTransformer

    def tiny_pit() -> nn.Module:
        return PoolingVisionTransformer(img_size=32, patch_size=8, stride=4, base_dims=[4, 4, 4],
                                        depth=[1, 1, 1], heads=[2, 4, 8], mlp_ratio=2, num_classes=10)  # fmt: skip

    graph = trace_channel_graph(tiny_pit())
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert_cut_computes_the_masked(tiny_pit(), torch.randn(2, 3, 32, 32))


def test_inception_nexts_split_is_cut_part_by_part_with_its_layer_scale() -> None:
    """InceptionNeXt's token mixer splits the channels by ``split_indexes`` (identity, square, wide and tall depthwise
    branches) and concatenates them back in order: each part is cut on its own and the cut sets the tuple. It was
    refused ("reordered on its way and scaled by a per-channel parameter the cut does not place")."""
    from timm.models.inception_next import MetaNeXt

    def tiny() -> nn.Module:
        return MetaNeXt(depths=(1, 1), dims=(16, 32), mlp_ratios=(2, 2), num_classes=10)

    graph = trace_channel_graph(tiny())
    stem = space_of(graph, "stem.0")
    assert stem.prunable and stem.scales and stem.splits, stem.refusals
    images = torch.randn(2, 3, 64, 64)
    assert_cut_computes_the_masked(tiny(), images)
    torch.manual_seed(0)
    compaction = masked_and_cut(randomize_norms(tiny()).eval(), images)[1]
    mixer = compaction.model.stages[0].blocks[0].token_mixer
    assert isinstance(mixer.split_indexes, tuple) and sum(mixer.split_indexes) == compaction.model.stem[0].out_channels


def test_mambaouts_gate_pairs_g_with_the_concatenated_i_and_conv_c() -> None:
    """MambaOut's ``fc2(act(g) * cat(i, conv(c)))``, ``g, i, c`` split from ``fc1`` by ``split_indices``: g's channel j
    meets row hidden + j, through i or the depthwise conv on c. It was refused ("joins channels that do not line
    up"): now the rows are cut in pairs, each part of the split keeps its share, and the cut sets the sizes."""
    model = timm.create_model("test_mambaout", num_classes=10)
    block = model.stages[0].blocks[0]
    graph = trace_channel_graph(model)
    gate = space_of(graph, "stages.0.blocks.0.fc1")
    assert gate.prunable and gate.groups == 2, gate.refusals
    assert [(split.owner, split.sizes) for split in gate.splits] == [("stages.0.blocks.0", block.split_indices)]
    images = torch.randn(2, 3, 64, 64)
    assert_cut_computes_the_masked(timm.create_model("test_mambaout", num_classes=10), images)
    torch.manual_seed(0)
    compaction = masked_and_cut(randomize_norms(model).eval(), images)[1]
    hidden, kept_i, kept_c = compaction.model.stages[0].blocks[0].split_indices
    assert hidden == kept_i + kept_c and kept_i > 0 and kept_c > 0


def test_a_space_cut_in_groups_keeps_a_channel_in_every_part_of_its_split() -> None:
    """MambaOut's pairs over a split in parts of 8, 6 and 2 (g, then i and c, of 16 rows): the two lowest positions
    are the last part's two; its better one is kept instead, and the next lowest pruned in its place, so the cut can
    still split the kept channels into three parts."""
    from pruneflow.graph.records import SplitSizes
    from pruneflow.pruning.criteria import select_in_groups

    space = ChannelSpace(16, groups=2, splits=[SplitSizes("block", (8, 6, 2))])
    scores = torch.tensor([5.0, 6, 7, 8, 9, 4, 1, 0] * 2)  # positions 7, 6 (c's), then 5 (i's) lowest
    pruned = select_in_groups(scores, space, 0.25, torch.zeros(16, dtype=torch.bool))
    assert pruned.view(2, 8)[0].nonzero().flatten().tolist() == [5, 7]
    assert torch.equal(pruned.view(2, 8)[0], pruned.view(2, 8)[1])


@pytest.mark.parametrize("make", [MultipliedChannels, GluBlock])
def test_the_cost_model_counts_k_entries_per_channel_after_a_multiplier(make) -> None:
    """A budget's cost model (``mask.target``) against the cut network's counted FLOPs and parameters: the multiplier
    convs' rows, their norms and the layer scale are k per channel of the space they were expanded into."""
    from test_budget import cut_costs, graph_spaces

    from pruneflow.pruning.budget import CostModel, allowed_counts

    torch.manual_seed(0)
    network = make().eval()
    image = torch.randn(1, 3, 8, 8) if make is MultipliedChannels else torch.randn(1, 6, 5)
    spaces = graph_spaces(network)
    model = CostModel(network, spaces, image)
    pruned = [int(allowed_counts(space, 0.9, 1)[-1]) for space in spaces]
    amounts = {space.name: count / space.width for space, count in zip(spaces, pruned, strict=True)}
    flops_ratio, params_ratio = cut_costs(network, spaces, amounts, image)
    counts = torch.tensor(pruned, dtype=torch.float64).numpy()
    assert model.measured_flops / model.flops(counts) == pytest.approx(flops_ratio, rel=1e-9)
    assert model.measured_params / model.params(counts) == pytest.approx(params_ratio, rel=1e-9)


class MultipliedFromTwoSpaces(nn.Module):
    """Two multiplier convs reading two different spaces, added: their output cannot follow both."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        self.left_up, self.right_up = nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1, groups=4)
        self.mix, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.left_up(torch.relu(self.left(x))) + self.right_up(torch.relu(self.right(x)))
        return self.head(self.mix(torch.relu(x)).mean((2, 3)))


def test_a_space_multiplied_from_two_spaces_refuses_both() -> None:
    """The first was expanded, the second refused alone: the cut of the first then cut ``right_up``'s rows too, and
    the cut network raised on its input width."""
    refused = {space.name: space.refusals for space in trace_channel_graph(MultipliedFromTwoSpaces()).spaces}
    assert refused["left"] and refused["right"], refused
    assert "writes each channel 2 times into channels of another space" in " ".join(refused["left"] + refused["right"])
    assert_cut_computes_the_masked(MultipliedFromTwoSpaces(), torch.randn(2, 3, 8, 8))
