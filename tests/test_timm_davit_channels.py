"""DaViT's channel attention (timm's ``davit.ChannelAttention``) cut inside its heads: the ``activation`` mask
removes a pruned head position from the softmax across a head's channels, so the cut of that position, from q, k
and v alike and from the stream its head width follows, computes the masked network; checked on a tiny DaViT."""

from __future__ import annotations

import pytest
import torch
from test_channel_graph import check_masked_and_cut
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")


def tiny_davit(v2: bool = False) -> nn.Module:
    """Two stages of one spatial and one channel block, 2 and 4 heads of 8 channels, 32 px; the window attentions on
    their fused path (which divides by √(head width) read from q), whatever timm's default, with q, k, v biases."""
    torch.manual_seed(0)
    model = timm.create_model("davit_tiny", num_classes=10, embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 4),
                              channel_attn_v2=v2)  # fmt: skip
    for block in (stage.blocks[0][0] for stage in model.stages):
        block.attn.fused_attn = True
        # timm starts the bias at 0 and the weights small, which would hide how the cut scales q's rows
        nn.init.normal_(block.attn.qkv.weight), nn.init.normal_(block.attn.qkv.bias)
    return randomize_norms(model).eval()


V2 = [False, True]  # V2: q scaled by the token count, its heads ``groups``, its logits qᵀ k and its output read from q


@pytest.mark.parametrize("v2", V2)
def test_each_channel_attentions_head_positions_are_cut_from_q_k_and_v_alike_tied_to_the_stream(v2: bool) -> None:
    graph = trace_channel_graph(tiny_davit(v2))
    rows = [space for space in graph.spaces if space.name.endswith("blocks.0.1.attn.qkv")]
    assert rows and all(space.prunable and not space.whole_heads and space.groups == 3 for space in rows)
    assert all(space.tied_to is not None for space in rows)
    # the window attentions reading the same streams, per position of a head too (whole heads and positions would
    # hold a stream to multiples of both its head width and its head count)
    windows = [space for space in graph.spaces if space.name.endswith("blocks.0.0.attn.qkv")]
    assert windows and all(space.prunable and not space.whole_heads and space.tied_to is not None for space in windows)


@pytest.mark.parametrize("v2", V2)
def test_a_tiny_davit_cut_inside_its_channel_heads_computes_the_masked_network(v2: bool) -> None:
    model = tiny_davit(v2)
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    attention = compaction.model.stages[1].blocks[0][1].attn
    # every head kept, half its positions
    assert getattr(attention, "groups" if v2 else "num_heads") == 4 and attention.qkv.out_features == 3 * 16
    window = compaction.model.stages[1].blocks[0][0].attn
    assert window.num_heads == 4 and window.qkv.out_features == 3 * 16 and window.fused_attn  # its q rows rescaled


@pytest.mark.parametrize("v2", V2)
def test_the_activation_mask_of_davits_channel_heads_leaks_nothing_and_gives_pruned_rows_no_gradient(v2: bool) -> None:
    graph = check_masked_and_cut(tiny_davit(v2), (3, 32, 32), "activation")
    assert any(space.heads > 1 and space.groups == 3 and space.tied_to is not None for space in graph.prunable)
