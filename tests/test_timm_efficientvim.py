"""EfficientViM on a tiny configuration (widths of 16 to 32, two blocks a stage, seconds): its stream through the
blocks' gated residuals (one gate per channel, the sigmoid of a parameter), its HSM-SSD mixer's hidden width cut in
pairs (``h * act(z)``), its state dims refused in one line; half of every prunable space masked (L1,
``activation``) and cut gives the masked network's function."""

from __future__ import annotations

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from torch import nn

from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)

MIXER = "stages.1.blocks.1.mixer"


def tiny_efficientvim() -> nn.Module:
    from timm.models.efficientvim import EfficientViM

    torch.manual_seed(0)
    model = EfficientViM(num_classes=10, embed_dim=(16, 24, 32), depths=(2, 2, 2), mlp_ratio=2.0, state_dim=(6, 5, 4))
    for name, parameter in model.named_parameters():  # gates of sigmoid(1e-4) and D = 1 would hide a wrong cut
        if name.endswith(("alpha", ".D")):
            nn.init.uniform_(parameter, -2.0, 2.0)
    return model


def test_efficientvim_stream_and_mixer_widths_are_cut_exactly() -> None:
    """EfficientViM was cut only in its FFNs and downsampling widths (1.37×): its blocks' residuals multiply each
    branch by ``sigmoid(alpha).view(4, -1, 1, 1)[k]``, one gate per channel (a parameter the graph did not follow),
    and its HSM-SSD mixer was traced into (``reshape``, ``matmul``). Now the gates are per-channel scales of the
    stream (``alpha`` cut along its channels), the mixer is read whole: ``hz_proj`` reads the stream (``x @ abᵀ``
    keeps x's channels), its rows cut in pairs, ``out_proj`` writes the stream; its state dims are refused."""
    graph = trace_channel_graph(tiny_efficientvim())
    stream = space_of(graph, "stages.1.blocks.0.mixer.out_proj.conv")
    assert stream.prunable, stream.refusals
    assert {"stages.1.blocks.1.dwconv1.conv", "stages.1.blocks.1.ffn.fc2.conv"} <= set(stream.names)
    assert {scale.name for scale in stream.scales} == {"stages.1.blocks.0.alpha", "stages.1.blocks.1.alpha"}
    hidden = space_of(graph, f"{MIXER}.hz_proj.conv")
    assert hidden.prunable and hidden.groups == 2, hidden.refusals
    states = space_of(graph, f"{MIXER}.BCdt_proj.conv")
    assert not states.prunable and "state" in states.refusals[0]
    cut = assert_cut_equals_masked(tiny_efficientvim(), 64).model
    mixer = cut.get_submodule(MIXER)
    assert mixer.hz_proj.conv.in_channels < 24 and mixer.d_inner < 24 and mixer.out_proj.conv.out_channels < 24
    assert cut.get_submodule("stages.1.blocks.1").alpha.shape[1] < 24


def test_a_fresh_efficientvim_given_the_cut_sizes_computes_the_cut_network() -> None:
    """A checkpoint of the cut network loads into a fresh one given the cut's sizes (``apply_sizes``): its mixers'
    ``d_inner`` and its blocks' ``alpha`` at the kept width."""
    from pruneflow.compaction.cut import apply_sizes

    cut = assert_cut_equals_masked(tiny_efficientvim(), 64)
    fresh = apply_sizes(tiny_efficientvim(), cut.sizes).eval()
    fresh.load_state_dict(cut.model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(images), cut.model.eval()(images))


def test_an_efficientvim_cut_while_training_computes_the_cut_network() -> None:
    """Cut in training (``swap_in``), the network's own mixers take the cut's ``d_inner``, by which they split."""
    from test_channel_graph import half_of_every_space

    from pruneflow.compaction import compact
    from pruneflow.compaction.while_training import swap_in

    model = tiny_efficientvim().eval()
    compaction = compact(model, half_of_every_space(trace_channel_graph(model)))
    swap_in(model, compaction, [torch.optim.SGD(model.parameters(), lr=0.1)])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(images), compaction.model.eval()(images))
    assert model.get_submodule(MIXER).d_inner == compaction.model.get_submodule(MIXER).d_inner < 24


class TwoGatedStreams(nn.Module):
    """Two streams that stay apart, each gated by a row of one parameter, as EfficientViM's branches are."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.alpha = nn.Parameter(torch.randn(2, 8))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.alpha).view(2, -1, 1, 1)
        return self.head(torch.cat([self.a(x) * gates[0], self.b(x) * gates[1]], 1).mean((2, 3)))


def test_one_gate_parameter_on_two_streams_that_stay_apart_refuses_both() -> None:
    """A cut of one stream would take the other's gate entries (one column of ``alpha`` per channel of both)."""
    graph = trace_channel_graph(TwoGatedStreams())
    refused = {space.name: space.refusals for space in graph.spaces if not space.prunable}
    reason = "parameter alpha scales the channels of several spaces that stay apart"
    assert refused.keys() == {"a", "b", "head"} and refused["a"] == refused["b"] == [reason], refused
