"""Attentions whose heads can only be cut whole while their output is reshaped by their input's width (XCiT's and
EdgeNeXt's XCA, EVA's with a rope): cut in whole heads, the stream losing one head's width per head, on tiny timm
configurations (seconds); half of every prunable space masked (L1, ``activation``) and cut gives the masked network's
function. DaViT's, whose channel attention is cut inside its heads (``test_timm_davit_channels``), checked here too."""

from __future__ import annotations

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.pruning.criteria import L1, make_criterion

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_davit(v2: bool = False) -> nn.Module:
    from timm.models.davit import DaVit

    torch.manual_seed(0)  # 2 and 4 heads of 16 channels: a window and a channel attention per stage
    return DaVit(depths=(1, 1), embed_dims=(32, 64), num_heads=(2, 4), window_size=4, num_classes=10,
                 channel_attn_v2=v2)  # fmt: skip


def tiny_xcit() -> nn.Module:
    from timm.models.xcit import Xcit

    torch.manual_seed(0)
    return Xcit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1, num_classes=10)


def tiny_dinov3() -> nn.Module:
    torch.manual_seed(0)  # EVA with q and v biases, 3 heads of 16, and a rope whose table the graph does not read
    return timm.create_model("vit_tiny_patch16_dinov3_qkvb", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=10, rope_type="mrope")  # fmt: skip


class CrossCovarianceBlock(nn.Module):
    """EdgeNeXt's XCA on a stream: ``x + xca(norm(x))`` between a patch embedding writing the stream and the head."""

    def __init__(self) -> None:
        from timm.models.edgenext import CrossCovarianceAttn

        super().__init__()
        self.embed, self.norm = nn.Conv2d(3, 32, 4, 4), nn.LayerNorm(32)
        self.xca, self.head = CrossCovarianceAttn(32, num_heads=4), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.xca(self.norm(x))
        return self.head(x.mean(1))


def assert_whole_heads_of_the_stream(heads: ChannelSpace, stream: ChannelSpace, count: int) -> None:
    assert heads.prunable and stream.prunable, heads.refusals + stream.refusals
    assert heads.whole_heads and heads.heads == count and heads.tied_to is stream
    assert stream.multiple % (stream.width // count) == 0  # whole multiples of a head's width


def test_davit_channel_and_window_attentions_are_cut_inside_their_heads_with_the_stream() -> None:
    """Both of a stage's attentions reshape their heads by the stream's width: each keeps its heads, as many positions
    per head as the stream keeps per head (the channel attention's softmax masked as the cut computes it)."""
    graph = trace_channel_graph(tiny_davit())
    stream = space_of(graph, "stem.conv")
    for attention in ("stages.0.blocks.0.0.attn.qkv", "stages.0.blocks.0.1.attn.qkv"):
        heads = space_of(graph, attention)
        assert heads.prunable and not heads.whole_heads and heads.heads == 2 and heads.tied_to is stream
    assert stream.multiple == 2
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    torch.manual_seed(0)
    model = randomize_norms(tiny_davit()).eval()
    _, compaction = masked_and_cut(model, torch.randn(2, 3, 32, 32))
    cut = compaction.model
    assert [cut.stages[s].blocks[0][1].attn.num_heads for s in (0, 1)] == [2, 4]
    assert cut.stem.conv.out_channels == 16
    assert_cut_equals_masked(tiny_davit(), 32)


def test_davit_v2_channel_attention_keeps_its_heads_in_groups_and_cuts_exactly() -> None:
    """V2 scales q by the token count and calls its heads ``groups``: cut inside them, it keeps them."""
    torch.manual_seed(0)
    _, compaction = masked_and_cut(randomize_norms(tiny_davit(v2=True)).eval(), torch.randn(2, 3, 32, 32))
    assert [compaction.model.stages[s].blocks[0][1].attn.groups for s in (0, 1)] == [2, 4]
    assert_cut_equals_masked(tiny_davit(v2=True), 32)


def test_xcit_cross_covariance_attention_cuts_whole_heads_with_their_temperature() -> None:
    """XCA's learned ``temperature`` (one per head) is cut with its heads; its Fourier position encoding's
    projection writes the stream it is added to, flattened to tokens by ``reshape(B, -1, N)``."""
    graph = trace_channel_graph(tiny_xcit())
    stream = space_of(graph, "pos_embed.token_projection")
    assert_whole_heads_of_the_stream(space_of(graph, "blocks.0.attn.qkv"), stream, 4)
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert [scale.name for scale in space_of(graph, "blocks.1.attn.qkv").scales] == ["blocks.1.attn.temperature"]
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    _, compaction = masked_and_cut(randomize_norms(tiny_xcit()).eval(), images)
    attention = compaction.model.blocks[0].attn
    assert attention.num_heads == 2 and attention.temperature.shape == (2, 1, 1)
    rebuilt = apply_sizes(tiny_xcit(), compaction.sizes).eval()  # a checkpoint of the cut network loads into it
    rebuilt.load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(images), compaction.model(images))
    assert_cut_equals_masked(tiny_xcit(), 32)


def test_edgenext_cross_covariance_attention_cuts_exactly() -> None:
    graph = trace_channel_graph(CrossCovarianceBlock())
    assert_whole_heads_of_the_stream(space_of(graph, "xca.qkv"), space_of(graph, "embed"), 4)
    assert_cut_equals_masked(CrossCovarianceBlock(), 16)


def test_eva_attention_with_a_rope_is_cut_in_whole_heads_with_the_stream() -> None:
    """A rope whose table is not read by frequencies (MRoPE's sections; DINOv3's own: ``test_timm_rope``) rotates
    pairs of positions inside every head alike: whole heads keep it, with their q and v biases; the stream loses
    their width."""
    graph = trace_channel_graph(tiny_dinov3())
    stream = space_of(graph, "patch_embed.proj")
    heads = space_of(graph, "blocks.0.attn.qkv")
    assert_whole_heads_of_the_stream(heads, stream, 3)
    assert {scale.name for scale in heads.scales} == {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"}
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    torch.manual_seed(0)
    _, compaction = masked_and_cut(randomize_norms(tiny_dinov3()).eval(), torch.randn(2, 3, 32, 32))
    attention = compaction.model.blocks[0].attn
    assert attention.num_heads == 2 and attention.q_bias.shape == attention.k_bias.shape == (32,)
    assert_cut_equals_masked(tiny_dinov3(), 32)


def test_a_stream_and_its_whole_heads_are_selected_alike_at_any_share() -> None:
    """A stream pruned in multiples of two heads' width (as if another attention read it too) is rounded to those
    at a share that is not one; its attentions lose the heads that width makes, not their own share of heads."""
    graph = trace_channel_graph(CrossCovarianceBlock())
    stream, heads = space_of(graph, "embed"), space_of(graph, "xca.qkv")
    stream.multiple = 16
    for amount in (0.3, 0.5, 0.8):
        pruned_stream = L1().select(stream, amount, torch.zeros(stream.width, dtype=torch.bool))
        pruned_heads = L1().select(heads, amount, torch.zeros(heads.width, dtype=torch.bool))
        whole = pruned_heads.view(3, 4, 8).all(-1).all(0)
        assert int(pruned_stream.sum()) == 8 * int(whole.sum()) and int(pruned_heads.sum()) == 24 * int(whole.sum())


def test_an_explicit_list_must_take_a_heads_width_from_the_stream_per_head() -> None:
    graph = trace_channel_graph(CrossCovarianceBlock())
    stream, heads = space_of(graph, "embed"), space_of(graph, "xca.qkv")
    head_0 = [part * 32 + row for part in range(3) for row in range(8)]
    lists = {stream.name: list(range(8)), heads.name: head_0}
    make_criterion("explicit", lists).check(graph.spaces)  # one head's width for one head: accepted
    with pytest.raises(ConfigError, match="one head's width per kept head"):
        make_criterion("explicit", {**lists, stream.name: list(range(4))}).check(graph.spaces)
