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
