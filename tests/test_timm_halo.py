"""timm's HaloNet attention on tiny configurations (small widths, depths and images: seconds): its key, value and
query rows cut at the same positions in every head, its output the value positions, and half of every prunable space
masked (L1, ``activation``) and cut gives the masked network's function."""

from __future__ import annotations

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_halonet(**attention: object) -> nn.Module:
    """A HaloNet of two self-attention stages (the second strided), heads of 4 positions, blocks of 4 pixels."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    torch.manual_seed(0)
    stages = (ByoBlockCfg(type="self_attn", d=1, c=16, s=1, gs=0, br=1.0),
              ByoBlockCfg(type="self_attn", d=2, c=32, s=2, gs=0, br=1.0))  # fmt: skip
    kwargs = {"block_size": 4, "halo_size": 1, "num_heads": 4, **attention}
    config = ByoModelCfg(blocks=stages, stem_chs=16, stem_type="7x7", stem_pool="maxpool", self_attn_layer="halo",
                         self_attn_kwargs=kwargs)  # fmt: skip
    return ByobNet(config, num_classes=10)


def test_halo_attention_rows_are_one_space_in_heads_split_into_keys_and_values() -> None:
    """``kv``'s rows one space of ``num_heads`` blocks (the same positions in each), split into key and value
    positions whose sizes the cut sets; ``q``'s rows points of the key positions, the position tables' columns scales
    of head 0's; the attention's output (its value positions) normalised by ``post_attn`` and read by ``conv3``."""
    model = tiny_halonet()
    graph = trace_channel_graph(model)
    block = "stages.1.1"
    rows = space_of(graph, f"{block}.self_attn.kv")
    assert rows.prunable and rows.groups == 4 and rows.width == 4 * (8 + 8), rows.refusals
    assert [split.sizes for split in rows.splits] == [(8, 8), (8, 8)]
    query = next(point for point in rows.points if point.name == f"{block}.self_attn.q")
    assert query.at[:16] == tuple(range(8)) + (-1,) * 8 and query.at[16:24] == tuple(range(8, 16))
    assert [scale.name for scale in rows.scales] == [
        f"{block}.self_attn.pos_embed.{t}" for t in ("height_rel", "width_rel")
    ]
    conv3 = next(consumer for consumer in rows.consumers if consumer.name == f"{block}.conv3_1x1.conv")
    assert conv3.at[8:16] == tuple(range(8)) and conv3.at[24:32] == tuple(range(8, 16))
    assert any(point.name == f"{block}.post_attn" for point in rows.points)
    refused = [(space.name, space.refusals) for space in graph.spaces if not space.prunable]
    assert [name for name, _ in refused] == ["head.fc"], refused


@pytest.mark.parametrize(
    "attention", [{}, {"dim_head": 4}, {"num_heads": 1}], ids=["equal-heads", "narrower-keys", "one-head"]
)
def test_halo_attention_cuts_to_the_masked_network(attention: dict) -> None:
    """Half of every space masked and cut: the same logits, and every attention's rows, position tables and the
    sizes it reshapes by smaller, as many positions in every head."""
    model = randomize_norms(tiny_halonet(**attention)).eval()  # β ≠ 0: a leaking mask would show
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    before, after = tiny_halonet(**attention), compaction.model
    for name, module in after.named_modules():
        if type(module).__name__ != "HaloAttn":
            continue
        old = before.get_submodule(name)
        key, value = module.dim_head_qk, module.dim_head_v
        assert 0 < key < old.dim_head_qk and 0 < value < old.dim_head_v, name
        heads = module.num_heads
        assert module.q.out_channels == module.dim_out_qk == heads * key and module.dim_out_v == heads * value
        assert module.kv.out_channels == heads * (key + value) and module.pos_embed.dim_head == key
        assert module.pos_embed.height_rel.shape[1] == module.pos_embed.width_rel.shape[1] == key


def test_halo_attention_with_other_projections_is_refused_in_one_line_and_the_rest_cuts_exactly() -> None:
    """A ``HaloAttn`` whose ``kv`` is not a plain conv (a subclass may compute otherwise): its rows and output refused
    in one line naming it, the space it reads still prunable, and the rest of the network cut exactly."""
    from timm.layers import Conv2dSame

    def with_other_kv() -> nn.Module:
        model = tiny_halonet()
        attention = model.get_submodule("stages.1.1.self_attn")
        kv = Conv2dSame(attention.kv.in_channels, attention.kv.out_channels, 1, bias=False)
        kv.weight.data.copy_(attention.kv.weight.data)
        attention.kv = kv
        return model

    graph = trace_channel_graph(with_other_kv())
    rows = space_of(graph, "stages.1.1.self_attn.kv")
    assert rows.refusals == [
        "attention stages.1.1.self_attn (HaloAttn) projects with other layers than nn.Conv2d q and kv"
    ]
    assert space_of(graph, "stages.1.1.conv1_1x1.conv").prunable
    assert_cut_equals_masked(with_other_kv(), 32)


def tiny_botnet(**attention: object) -> nn.Module:
    """A BoTNet of one bottleneck and one self-attention stage (strided: its attention pools), on 32 px images."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    torch.manual_seed(0)
    stages = (ByoBlockCfg(type="bottle", d=1, c=16, s=1, gs=0, br=0.5),
              ByoBlockCfg(type="self_attn", d=2, c=32, s=2, gs=0, br=1.0))  # fmt: skip
    config = ByoModelCfg(blocks=stages, stem_chs=16, stem_type="tiered", stem_pool="maxpool", fixed_input_size=True,
                         self_attn_layer="bottleneck", self_attn_kwargs={"num_heads": 4, **attention})  # fmt: skip
    return ByobNet(config, img_size=32, num_classes=10)


def test_bottleneck_attention_rows_are_one_space_of_q_k_v_blocks_and_cut_to_the_masked_network() -> None:
    """BoTNet's ``qkv`` rows (every head's q, then k, then v) one space of 3 × 4 equal blocks, its output the v rows,
    its position tables' columns head 0's q positions; half of every space masked and cut gives the masked logits,
    each attention's rows, tables and head widths smaller."""
    graph = trace_channel_graph(tiny_botnet())
    rows = space_of(graph, "stages.1.1.self_attn.qkv")
    assert rows.prunable and rows.groups == 12 and rows.width == 3 * 32, rows.refusals
    conv3 = next(consumer for consumer in rows.consumers if consumer.name == "stages.1.1.conv3_1x1.conv")
    assert conv3.at == (-1,) * 64 + tuple(range(32))
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    model = randomize_norms(tiny_botnet()).eval()
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    for name in ("stages.1.0.self_attn", "stages.1.1.self_attn"):
        attention = compaction.model.get_submodule(name)
        width = attention.dim_head_qk
        assert 0 < width == attention.dim_head_v < 8 and attention.qkv.out_channels == 3 * 4 * width
        assert attention.pos_embed.height_rel.shape[1] == attention.pos_embed.dim_head == width


def test_bottleneck_attention_with_narrower_keys_is_refused_in_one_line() -> None:
    """q/k heads narrower than v heads: its rows are not equal blocks; refused in one line, the rest cut exactly."""
    graph = trace_channel_graph(tiny_botnet(dim_head=4))
    assert space_of(graph, "stages.1.1.self_attn.qkv").refusals == [
        "attention stages.1.1.self_attn (BottleneckAttn) has heads of other q/k widths than v widths, which its q, k, "
        "v rows do not cut in equal blocks"
    ]
    assert_cut_equals_masked(tiny_botnet(dim_head=4), 32)
