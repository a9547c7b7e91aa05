"""TNT (Transformer in Transformer, issue 31) on a tiny config: 4 patches of 16 pixels each, an inner (pixel) stream of
8 channels in 2 heads, an outer (patch) stream of 32 channels in 4 heads, 2 blocks; legacy (a LayerNorm per pixel
before each block's ``proj``) and not (a LayerNorm over a patch's flattened pixels, and one after ``proj``).

Each block's ``proj`` reads a patch's pixel tokens flattened, pixel-major: an inner channel owns 16 of its columns
at the stride of the inner width. Half of every prunable space masked with ``activation`` and the cut compared with
the masked network (norms randomised, so a leaking mask would show).
"""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.cut import Compaction, apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")

TINY = {"img_size": 32, "embed_dim": 32, "inner_dim": 8, "depth": 2, "num_heads_inner": 2, "num_heads_outer": 4}
MODELS = ("tnt_s_legacy_patch16_224", "tnt_s_patch16_224")


def tiny_tnt(name: str, **settings: int) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **{**TINY, **settings})
    for parameter in model.parameters():  # large enough that a masked channel changes the logits
        nn.init.normal_(parameter, std=0.2)
    return randomize_norms(model).eval()


def space_of(spaces: list[ChannelSpace], name: str) -> ChannelSpace:
    return next(space for space in spaces if name in space.names)


def cut_computes_the_masked(name: str, **settings: int) -> Compaction:
    model = tiny_tnt(name, **settings)
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction


@pytest.mark.parametrize("name", MODELS)
def test_both_streams_and_both_attentions_heads_are_prunable(name: str) -> None:
    spaces = trace_channel_graph(tiny_tnt(name)).spaces
    inner, outer = space_of(spaces, "pixel_embed.proj"), space_of(spaces, "proj")
    assert inner.prunable and outer.prunable, (inner.refusals, outer.refusals)
    assert {"blocks.1.attn_in.proj", "blocks.1.mlp_in.fc2"} <= set(inner.names)
    assert {"blocks.0.proj", "blocks.1.attn_out.proj", "blocks.1.mlp.fc2"} <= set(outer.names)
    assert {source.name for source in inner.sources} == {"pixel_pos"}
    assert {source.name for source in outer.sources} == {"cls_token", "patch_pos"}
    for attention, heads in (("attn_in", 2), ("attn_out", 4)):
        rows = space_of(spaces, f"blocks.0.{attention}.qk")
        assert rows.prunable and rows.width // rows.block == heads, rows.refusals  # pruned in whole heads
        assert f"blocks.0.{attention}.v" in rows.names


@pytest.mark.parametrize("name", MODELS)
def test_a_cut_tnt_computes_the_masked_network_with_both_streams_and_heads_narrower(name: str) -> None:
    compaction = cut_computes_the_masked(name)
    model = compaction.model
    assert model.pixel_embed.in_dim == model.pixel_embed.proj.out_channels < 8
    assert model.pixel_pos.shape[1] == model.pixel_embed.in_dim
    assert model.cls_token.shape[-1] == model.patch_pos.shape[-1] == model.head.in_features < 32
    block = model.blocks[0]
    assert block.proj.in_features == 16 * model.pixel_embed.in_dim  # a kept inner channel's 16 pixels
    assert block.attn_in.num_heads < 2 and block.attn_out.num_heads < 4
    assert block.attn_out.v.out_features == block.attn_out.num_heads * block.attn_out.head_dim


def test_a_fresh_tnt_given_the_cut_sizes_computes_the_cut_network() -> None:
    compaction = cut_computes_the_masked(MODELS[0])
    fresh = apply_sizes(tiny_tnt(MODELS[0]), compaction.sizes)
    fresh.load_state_dict(compaction.model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), compaction.model(images))


def test_a_single_headed_inner_attention_keeps_its_rows_and_the_rest_is_cut_exactly() -> None:
    """One inner head: its q/k/v rows are refused in one line naming the attention; the inner stream it reads and
    writes, which no width of it follows, is cut all the same."""
    spaces = trace_channel_graph(tiny_tnt(MODELS[0], num_heads_inner=1)).spaces
    rows = space_of(spaces, "blocks.0.attn_in.qk")
    assert rows.refusals == ["attention blocks.0.attn_in has a single head, which a cut in whole heads cannot take"]
    assert space_of(spaces, "pixel_embed.proj").prunable
    model = cut_computes_the_masked(MODELS[0], num_heads_inner=1).model
    assert model.blocks[0].attn_in.qk.out_features == 16 and model.pixel_embed.in_dim < 8
