"""timm's ViT variants (issue 31): PVT-v2, Twins, ConViT, SAM2's Hiera, VOLO and NesT, tiny configs of each (PVT-v2's
and Twins' 2 stages of 16 and 32 channels, one head then two), half of every prunable space masked with
``activation`` and the cut compared with the masked network, on weights large enough that a masked channel changes
the logits.

Their attentions reshape the heads' output by the input's width: the q/k/v rows are tied to the stream, ``q`` and
``kv`` (k rows, then v rows) one space (ConViT's ``qk`` and ``v``), the spatial reduction ``sr`` cut with the stream
it is reshaped by.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_timm_attention_classes import assert_same, mask_half
from torch import Tensor, nn

from pruneflow.compaction import CompactionError, compact
from pruneflow.graph import ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")

# 2 stages of 16 and 32 channels, one head then two; the first stage reduces its keys 2 × 2 (``sr``)
PYRAMID = {"embed_dims": (16, 32), "num_heads": (1, 2), "mlp_ratios": (2, 2), "sr_ratios": (2, 1)}
CONFIGS = {
    "pvt_v2_b0": {**PYRAMID, "depths": (1, 1)},
    "twins_svt_small": {**PYRAMID, "depths": (2, 2), "wss": (2, 2), "img_size": 32},
    # a gated positional attention (GPSA), then the class token and a plain one (MHSA); 2 heads of 16
    # a windowed stage of one block, then a stage that pools its queries, its last block global; 2 heads, then 4
    "sam2_hiera_tiny": {
        "embed_dim": 16,
        "num_heads": 2,
        "stages": (1, 2),
        "global_att_blocks": (2,),
        "window_spec": (4, 2),
        "global_pos_size": (4, 4),
        "q_pool": 1,
    },
    "convit_tiny": {
        "embed_dim": 16,
        "num_heads": 2,
        "depth": 2,
        "local_up_to_layer": 1,
        "img_size": 32,
        "patch_size": 8,
    },
}


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **CONFIGS[name])
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model.eval()


def masked_and_cut(model: nn.Module, size: int = 32) -> tuple[list[ChannelSpace], Tensor, Tensor, nn.Module]:
    graph, masks = mask_half(model)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks).model
        return graph.spaces, cut(images), masked, cut


def space_of(spaces: list[ChannelSpace], name: str) -> ChannelSpace:
    return next(space for space in spaces if name in space.names)


@pytest.mark.parametrize("fused", [True, False])
def test_pvt_v2_heads_follow_the_stream_and_its_cut_is_the_masked_network(fused: bool) -> None:
    model = tiny("pvt_v2_b0")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    spaces, cut, masked, network = masked_and_cut(model)
    assert_same(cut, masked)
    heads = space_of(spaces, "stages.0.blocks.0.attn.kv")
    assert heads.prunable and heads.parts == 1 and heads.tied_to is space_of(spaces, "patch_embed.proj")
    assert "stages.0.blocks.0.attn.sr" in heads.tied_to.names  # reshaped by the stream's width: cut with it
    assert [space.name for space in spaces if not space.prunable] == ["head"]
    first, second = network.stages[0].blocks[0].attn, network.stages[1].blocks[0].attn
    assert (first.q.out_features, first.kv.out_features, first.sr.out_channels, first.head_dim) == (8, 16, 8, 8)
    assert (second.num_heads, second.head_dim, second.proj.in_features) == (2, 8, 16) and not second.fused_attn


def test_twins_attentions_and_position_conv_are_cut_as_the_masked_network() -> None:
    spaces, cut, masked, network = masked_and_cut(tiny("twins_svt_small"))
    assert_same(cut, masked)
    stream = space_of(spaces, "patch_embeds.1.proj")
    assert stream.prunable and "pos_block.1.proj.0" in stream.names
    for name in ("blocks.1.0.attn.qkv", "blocks.1.1.attn.kv"):  # windowed, then global sub-sampled
        assert space_of(spaces, name).prunable and space_of(spaces, name).tied_to is stream
    # every stage's stream, through the reshape of its tokens to the grid its patch embedding made (a stage's end)
    assert [space.name for space in spaces if not space.prunable] == ["head"]
    for block, width in zip(network.blocks, (8, 16), strict=True):  # one head, then two: each keeps half its width
        attentions = (block[0].attn.qkv.out_features, block[1].attn.q.out_features, block[1].attn.kv.out_features)
        assert attentions == (3 * width, width, 2 * width)


def test_tokens_to_a_grid_that_is_not_the_patch_embedding_s_stay_refused() -> None:
    """``x.reshape(B, H, W, -1)`` keeps the channels last only where ``H``, ``W`` are the grid of the conv that wrote
    the stream (kernel = stride, no padding): from another tensor's shape, ``-1`` could hold several tokens."""

    class Tokens(nn.Module):
        def __init__(self, stride: int) -> None:
            super().__init__()
            self.proj, self.head = nn.Conv2d(3, 8, 4, stride=stride), nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            B, _, H, W = x.shape
            tokens = self.proj(x).flatten(2).transpose(1, 2)
            grid = tokens.reshape(B, H // 4, W // 4, -1).permute(0, 3, 1, 2)
            return self.head(grid.mean((2, 3)))

    assert trace_channel_graph(Tokens(4)).spaces[0].prunable
    assert not trace_channel_graph(Tokens(2)).spaces[0].prunable  # 2 × the positions: -1 is half the width


def test_convit_gated_and_plain_attentions_are_cut_as_the_masked_network() -> None:
    spaces, cut, masked, network = masked_and_cut(tiny("convit_tiny"))
    assert_same(cut, masked)
    assert [space.name for space in spaces if not space.prunable] == ["head"]
    stream = space_of(spaces, "patch_embed.proj")
    assert (
        space_of(spaces, "blocks.0.attn.v").tied_to is stream
        and space_of(spaces, "blocks.1.attn.qkv").tied_to is stream
    )
    gated, plain = network.blocks[0].attn, network.blocks[1].attn
    assert (gated.qk.out_features, gated.v.out_features, gated.gating_param.numel(), plain.qkv.out_features) == (
        32,
        16,
        2,
        48,
    )
    assert network.cls_token.shape[-1] == network.pos_embed.shape[-1] == 16


def test_sam2_hiera_position_embedding_windows_and_pooled_heads_are_cut_as_the_masked_network() -> None:
    spaces, cut, masked, network = masked_and_cut(tiny("sam2_hiera_tiny"), size=64)
    assert_same(cut, masked)
    assert [space.name for space in spaces if not space.prunable] == ["head.fc"]
    sources = {source.name for source in space_of(spaces, "patch_embed.proj").sources}
    assert sources == {"pos_embed", "pos_embed_window"}  # interpolated, tiled, summed: each a source of the stream
    assert all(space_of(spaces, f"blocks.{i}.attn.qkv").whole_heads for i in range(3))
    pooled = network.blocks[1].attn  # its q max-pooled: two heads of four kept, each 8 wide
    assert (pooled.num_heads, pooled.dim_out, pooled.qkv.out_features) == (2, 16, 48)
    assert network.pos_embed.shape[1] == network.pos_embed_window.shape[1] == 8


@pytest.mark.parametrize("read_again", [False, True])
def test_a_position_embedding_of_two_parameters_is_a_source_unless_read_elsewhere(read_again: bool) -> None:
    """A parameter of the sum read by another op too: masking it for the stream would change that op."""

    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.head = nn.Conv2d(3, 8, 4, stride=4), nn.Linear(8, 2)
            self.pos, self.tile = nn.Parameter(torch.randn(1, 8, 2, 2)), nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            x = self.proj(x).permute(0, 2, 3, 1)
            position = F.interpolate(self.pos, size=x.shape[1:3]) + self.tile.tile((2, 2))
            logits = self.head((x + position.permute(0, 2, 3, 1)).mean((1, 2)))
            return logits + self.tile.sum() if read_again else logits

    assert trace_channel_graph(Embedded()).spaces[0].prunable is not read_again


def test_volo_outlook_and_plain_attentions_are_cut_as_the_masked_network() -> None:
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    shape = {"layers": (1, 1), "embed_dims": (16, 32), "num_heads": (2, 2), "stem_hidden_dim": 8, "patch_size": 4}
    model = VOLO(num_classes=10, img_size=32, outlook_attention=(True, False), downsamples=(True, False), **shape)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    spaces, cut, masked, network = masked_and_cut(model.eval())
    assert_same(cut, masked)
    outlook = space_of(spaces, "network.0.0.attn.v")  # values unfolded per head, C // heads each: tied to the stream
    assert outlook.prunable and outlook.tied_to is space_of(spaces, "patch_embed.proj")
    assert space_of(spaces, "network.2.0.attn.qkv").tied_to is space_of(spaces, "network.1.proj")
    attention = network.network[0][0].attn
    assert (attention.v.out_features, attention.attn.in_features, attention.attn.out_features) == (8, 8, 2 * 3**4)


def nest() -> nn.Module:
    from timm.models.nest import Nest

    torch.manual_seed(0)
    model = Nest(num_classes=10, embed_dims=(16, 32), num_heads=(2, 4), depths=(1, 1), num_levels=2, img_size=32,
                 patch_size=4)  # fmt: skip
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model.eval()


def test_nest_head_minor_attention_keeps_the_same_value_positions_in_every_head() -> None:
    spaces, cut, masked, network = masked_and_cut(nest())
    assert_same(cut, masked)
    assert [space.name for space in spaces if not space.prunable] == ["head"]
    heads = space_of(spaces, "levels.1.transformer_encoder.0.attn.qkv")
    assert heads.values_alike and heads.tied_to is space_of(spaces, "levels.1.pool.conv")
    attention = network.levels[1].transformer_encoder[0].attn
    assert (attention.num_heads, attention.qkv.out_features, attention.proj.in_features) == (4, 48, 16)


def test_nest_values_kept_at_other_positions_per_head_are_not_cut() -> None:
    """Head 0 keeps value positions 0-3, head 1 positions 4-7: cut, the head-minor columns would come out in another
    order than the cut attention writes them, so the cut refuses (the criteria never select so)."""
    model = nest()
    graph = trace_channel_graph(model)
    stream, heads = (
        space_of(graph.spaces, "patch_embed.proj"),
        space_of(graph.spaces, "levels.0.transformer_encoder.0.attn.qkv"),
    )
    positions = torch.zeros(3, 2, 8, dtype=torch.bool)
    positions[:2, :, 4:] = True  # q and k: the same positions in both heads
    positions[2, 0, 4:], positions[2, 1, :4] = True, True
    masks = {name: torch.arange(16) % 2 == 1 for name in stream.names}
    masks["levels.0.transformer_encoder.0.attn.qkv"] = positions.flatten()
    assert heads.values_alike
    with pytest.raises(CompactionError, match="head-minor"):
        compact(model, masks)
