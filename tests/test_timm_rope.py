"""EVA's attention under a rotary position embedding (DINOv3's, EVA-02's rope): its q/k positions cut by whole
frequencies of the rope's table, the same in every head and block, the table cut with them (``timm_rope``)."""

from __future__ import annotations

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.errors import ConfigError
from pruneflow.graph import trace_channel_graph
from pruneflow.pruning.criteria import make_criterion

timm = pytest.importorskip("timm")


def tiny_dinov3() -> nn.Module:
    torch.manual_seed(0)  # DINOv3's rope ("rotate half", 4 periods for heads of 16), q and v biases, 5 prefix tokens
    return timm.create_model("vit_tiny_patch16_dinov3_qkvb", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, num_classes=10)  # fmt: skip


def tiny_eva02() -> nn.Module:
    torch.manual_seed(0)  # EVA-02's rope: interleaved pairs, 4 bands, its table cached for a fixed grid
    return timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                             num_heads=3, ref_feat_shape=(4, 4), num_classes=10)  # fmt: skip


def assert_cut_by_frequencies(build: type[nn.Module] | object, table: str) -> None:
    """``build()``'s q/k positions are cut by whole frequencies shared by its blocks, its rope's table with them,
    exactly, on its fused attention path and its unfused one, and a fresh model given the cut's sizes computes the
    cut network."""
    graph = trace_channel_graph(build())
    stream, heads = space_of(graph, "patch_embed.proj"), space_of(graph, "blocks.0.attn.qkv")
    assert heads.prunable and not heads.whole_heads and heads.tied_to is stream, heads.refusals
    assert heads.rope is space_of(graph, "blocks.1.attn.qkv").rope and heads.rope.owner == "rope"
    assert stream.multiple == 12  # 3 heads, 4 positions (a pair on each axis) per frequency
    torch.manual_seed(0)
    model = build()
    for parameter in model.parameters():  # logits large enough that a wrong scale would show
        nn.init.normal_(parameter, std=0.2)
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(randomize_norms(model).eval(), images)
    cut = compaction.model
    assert getattr(cut.rope, table).numel() == 2 and cut.rope.dim == 8  # half of 4 frequencies, heads of 8
    assert cut.blocks[1].attn.qkv.out_features == 72 and cut.blocks[1].attn.num_heads == 3
    for fused in (True, False):  # its full width's scale folded into its q rows: either path computes the masked
        for block in cut.blocks:
            block.attn.fused_attn = fused
        with torch.no_grad():
            assert torch.allclose(cut(images), masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())
    rebuilt = apply_sizes(build(), compaction.sizes).eval()
    rebuilt.load_state_dict(cut.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())
    assert_cut_equals_masked(build(), 32)


def test_dinov3_rope_is_cut_by_whole_frequencies_with_its_periods() -> None:
    assert_cut_by_frequencies(tiny_dinov3, "periods")


def test_eva02_rope_is_cut_by_whole_frequencies_with_its_cached_table() -> None:
    assert_cut_by_frequencies(tiny_eva02, "bands")
    cut = masked_and_cut(randomize_norms(tiny_eva02()).eval(), torch.randn(1, 3, 32, 32))[1].model
    assert cut.rope.pos_embed.shape == (16, 16)  # 16 patches, sin and cos of 8 positions


def test_an_explicit_list_must_name_whole_frequencies_of_the_rope() -> None:
    """Bad input is refused before training, in one line naming the rope: positions 0 and 8 are frequency 0's pair
    on the first axis only (its pair on the second axis is 4 and 12)."""
    graph = trace_channel_graph(tiny_dinov3())
    stream = space_of(graph, "patch_embed.proj")
    lists = {stream.name: list(range(0, 48, 4))}  # one position per 4: 4 of each head's 16
    for block in (0, 1):
        heads = space_of(graph, f"blocks.{block}.attn.qkv")
        whole = [part * 48 + head * 16 + p for part in range(3) for head in range(3) for p in (0, 4, 8, 12)]
        lists[heads.name] = whole
    make_criterion("explicit", lists).check(graph.spaces)  # frequency 0 from every head: accepted
    partial = [part * 48 + head * 16 + p for part in range(3) for head in range(3) for p in (0, 8, 1, 9)]
    with pytest.raises(ConfigError, match="rope rope: whole frequencies"):
        make_criterion("explicit", {**lists, "blocks.0.attn.qkv": partial}).check(graph.spaces)


def test_a_table_also_read_by_an_attention_keeping_its_positions_stays_whole() -> None:
    """Block 1 normalises q and k over a head's positions (whole heads only) but reads the same table: cutting the
    table for block 0 would rotate block 1's q and k by other frequencies, so block 0's positions are refused too,
    naming the op, with the stream they are tied to; the rest is still cut exactly."""

    def build() -> nn.Module:
        model = tiny_dinov3()
        model.blocks[1].attn.q_norm, model.blocks[1].attn.k_norm = nn.LayerNorm(16), nn.LayerNorm(16)
        return model

    graph = trace_channel_graph(build())
    heads = space_of(graph, "blocks.0.attn.qkv")
    assert not heads.prunable and "rope rope's frequencies also rotate EvaAttention blocks.1.attn" in heads.refusals[-1]
    assert not space_of(graph, "patch_embed.proj").prunable
    assert_cut_equals_masked(build(), 32)  # the MLPs' hidden widths
