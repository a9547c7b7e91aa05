"""timm's split attentions and multi-branch blocks (SKNet, ResNeSt, Res2Net): each block on its own, small (seconds),
half of every prunable space masked by L1 with ``activation`` and cut, the cut network equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_graph_defects import assert_cut_equals_masked
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.cut import apply_sizes
from pruneflow.graph import ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def around(block: nn.Module, cin: int, cout: int) -> nn.Module:
    """``block`` between a stem (its input a space of its own) and a classifier."""
    stem = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.BatchNorm2d(cin), nn.ReLU())
    return nn.Sequential(stem, block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, 5))


def assert_rebuilt_from_sizes(model: nn.Module) -> None:
    """A fresh copy given the cut's widths (``apply_sizes``: an export, a checkpoint written after a cut) loads the
    cut weights and computes the cut network: the sizes the forward splits by are among them."""
    torch.manual_seed(0)
    fresh, images = copy.deepcopy(model).eval(), torch.randn(2, 3, 6, 6)
    _, compaction = masked_and_cut(model.eval(), images)
    apply_sizes(fresh, compaction.sizes).load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images), compaction.model(images))


def space_of(model: nn.Module, name: str) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if name in space.names)


@pytest.mark.parametrize("split_input", [True, False])
def test_selective_kernel_paths_are_one_space_and_its_logits_follow_them(split_input: bool) -> None:
    """SKNet's paths were refused at ``torch.stack`` and the softmax over the paths (skresnet18 1.34x)."""
    from timm.layers import SelectiveKernel

    torch.manual_seed(0)
    model = around(SelectiveKernel(8, 12, rd_channels=4, split_input=split_input), 8, 12)
    paths = space_of(model, "1.paths.0.conv")
    assert paths.prunable and paths.names == ["1.paths.0.conv", "1.paths.1.conv"], paths.refusals
    assert [(point.name, point.offset) for point in paths.points] == [("1.attn.fc_select", 0), ("1.attn.fc_select", 12)]
    stem = space_of(model, "0.0")
    assert stem.prunable and stem.groups == (2 if split_input else 1), stem.refusals
    assert space_of(model, "1.attn.fc_reduce").prunable
    assert_cut_equals_masked(model)
    assert_rebuilt_from_sizes(model)


def test_split_attention_radix_parts_are_cut_at_the_same_channels() -> None:
    """ResNeSt's radix parts were refused at ``.sum()`` over the radix and ``RadixSoftmax`` (resnest14d 2.46x)."""
    from timm.layers import SplitAttn

    torch.manual_seed(0)
    model = around(SplitAttn(8, 6, radix=2, rd_channels=4, norm_layer=nn.BatchNorm2d), 8, 6)
    parts = space_of(model, "1.conv")
    assert parts.prunable and parts.groups == 2 and parts.width == 12, parts.refusals
    assert [(point.name, point.offset) for point in parts.points] == [("1.fc2", 0)]
    assert space_of(model, "0.0").prunable and space_of(model, "1.fc1").prunable
    assert_cut_equals_masked(model)
    assert_rebuilt_from_sizes(model)


def test_split_attention_in_cardinal_groups_is_refused_in_one_line() -> None:
    from timm.layers import SplitAttn

    model = around(SplitAttn(8, 8, groups=2, radix=2, rd_channels=4, norm_layer=nn.BatchNorm2d), 8, 8)
    assert space_of(model, "1.conv").refusals == [
        "SplitAttn 1 takes its softmax in 2 cardinal groups, whose rows are interleaved"]


def bottle2neck(first: bool) -> nn.Module:
    """A Res2NeXt block of 4 scales of 8 channels in 2 cardinal groups; ``first``: its stage's first (no adds)."""
    from timm.models.res2net import Bottle2neck

    cin = 16 if first else 32
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)) if first else None
    block = Bottle2neck(cin, 8, downsample=downsample, cardinality=2, base_width=32, norm_layer=nn.BatchNorm2d)
    return around(block, cin, 32)


@pytest.mark.parametrize("first", [False, True])
def test_res2net_scales_are_equal_parts_of_one_space_each_scales_output_following_its_part(first: bool) -> None:
    """Res2NeXt's scales were refused: a grouped conv read a part of the split, and ``sp + spx[i]`` adds a conv's
    output to a part (res2next50 2.00x). The parts stay equal (``split(self.width)``): the same positions go from
    every part and, through the grouped convs, from each of their groups."""
    torch.manual_seed(0)
    model = bottle2neck(first)
    graph = trace_channel_graph(model)
    scales = next(space for space in graph.spaces if "1.conv1" in space.names)
    assert scales.prunable and scales.groups == 8 and not scales.routes, scales.refusals
    embedded = {point.name for point in scales.points}
    assert embedded == (set() if first else {"1.convs.0", "1.bns.0", "1.convs.1", "1.bns.1"})
    assert all(space.prunable for space in graph.spaces if space.name != "4")
    assert_cut_equals_masked(model)
    assert_rebuilt_from_sizes(model)


def test_focal_modulation_query_and_context_rows_are_cut_its_gates_kept() -> None:
    """FocalNet's ``f`` was refused at ``gates[:, l:l+1]`` (focalnet_tiny_srf 2.65x): its query rows and ``h``'s,
    and its context rows and the depthwise convs, are two spaces; the gate rows stay; ``input_split`` follows."""
    from timm.models.focalnet import FocalModulation

    torch.manual_seed(0)
    model = around(FocalModulation(8, focal_window=3, focal_level=2), 8, 8)
    query, context = space_of(model, "1.h"), space_of(model, "1.focal_layers.0.0")
    assert query.prunable and context.prunable and context.names == ["1.focal_layers.0.0", "1.focal_layers.1.0"]
    assert [(point.name, point.offset) for point in (*query.points, *context.points)] == [("1.f", 0), ("1.f", 8)]
    assert_cut_equals_masked(model)
    assert_rebuilt_from_sizes(model)
    _, compaction = masked_and_cut(model, torch.randn(2, 3, 6, 6))
    split = compaction.model[1].input_split
    assert split[2] == 3 and compaction.model[1].f.out_channels == sum(split) and split[:2] == [4, 4]


def test_focal_modulation_with_a_norm_after_the_product_is_refused_in_one_line() -> None:
    from timm.models.focalnet import FocalModulation

    model = around(FocalModulation(8, focal_window=3, focal_level=2, use_post_norm=True), 8, 8)
    assert space_of(model, "1.h").refusals == [
        "focal modulation 1 normalises its modulated query over the channels (use_post_norm)"]


def test_next_transformer_block_attention_heads_follow_the_stream() -> None:
    """NextViT's E-MHSA was refused at ``scaled_dot_product_attention``, its output reshaped by the stream's width
    and the concatenation after it (nextvit_small 2.11x): its q/k/v heads are tied to the stream it reads, its
    reduction's BatchNorm1d a point of it, and its output, viewed by the stream's ``C``, joins the stream. The stream
    is read by the conv block's grouped conv too, a group per head: selected by groups, a multiple of the heads."""
    from timm.models.nextvit import NextConvBlock, NextTransformerBlock

    torch.manual_seed(0)
    blocks = nn.Sequential(NextConvBlock(32, 32, drop_path=0.0, head_dim=8),
                           NextTransformerBlock(32, 64, drop_path=0.0, sr_ratio=2, head_dim=8, mix_block_ratio=0.5))
    model = around(blocks, 32, 64)
    graph = trace_channel_graph(model)
    heads = next(space for space in graph.spaces if "1.1.e_mhsa.q" in space.names)
    stream = next(space for space in graph.spaces if "1.1.e_mhsa.proj" in space.names)
    assert heads.prunable and heads.heads == 4 and heads.parts == 1 and heads.tied_to is stream, heads.refusals
    assert stream.prunable and "1.1.e_mhsa.norm" in {point.name for point in stream.points}, stream.refusals
    assert stream.groups == stream.multiple == 4
    assert_cut_equals_masked(model)
    assert_rebuilt_from_sizes(model)
