"""timm's mobile hybrid attentions on tiny configurations (small widths, depths and images: seconds): what the graph
cuts of each, and half of every prunable space masked (L1, ``activation``) and cut gives the masked network's
function."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_efficientformerv2() -> nn.Module:
    from timm.models.efficientformer_v2 import EfficientFormerV2

    torch.manual_seed(0)
    return EfficientFormerV2(depths=(1, 1, 2, 2), embed_dims=(8, 16, 24, 32), img_size=64, num_vit=2, mlp_ratios=2,
                             num_classes=10)  # fmt: skip


def tiny_efficientvit_mit() -> nn.Module:
    from timm.models.efficientvit_mit import EfficientVit

    torch.manual_seed(0)
    return EfficientVit(widths=(8, 8, 16, 16, 32), depths=(1, 1, 1, 2, 2), head_dim=8, head_widths=(32, 40),
                        num_classes=10)  # fmt: skip


def test_efficientformerv2_talking_heads_are_cut_by_positions_per_head_and_cut_exactly() -> None:
    """EfficientFormerV2's ``Attention2d`` (and its downsampling one): its q and k rows one space (a position cut
    from both), its v rows another carried by ``v_local`` and read by ``proj``, each of ``num_heads`` heads kept
    whole in count; its strided depthwise conv joins the stream it reads."""
    model = tiny_efficientformerv2()
    graph = trace_channel_graph(model)
    attention = "stages.3.blocks.1.token_mixer"
    query_key, values = space_of(graph, f"{attention}.q.conv"), space_of(graph, f"{attention}.v.conv")
    assert space_of(graph, f"{attention}.k.conv") is query_key and query_key.parts == 1 and query_key.heads == 8
    assert f"{attention}.v_local.conv" in values.names and values.held_by == [(attention, "dh")]
    stream = space_of(graph, "stages.2.downsample.conv.conv")  # read by strided depthwise convs, which carry it
    assert {"stages.2.blocks.1.token_mixer.stride_conv.conv", "stages.3.downsample.attn.q.local"} <= set(stream.names)
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"], [
        (space.name, space.refusals) for space in graph.spaces if not space.prunable
    ]
    assert_cut_equals_masked(tiny_efficientformerv2(), 64)


def test_efficientvit_mit_linear_attention_is_cut_in_whole_heads_and_cuts_exactly() -> None:
    """EfficientViT-MIT's ``LiteMLA``: its q/k/v rows (heads of ``dim`` q, k and v rows side by side) one space
    pruned in whole heads (``block``), carried by each scale's depthwise and grouped conv and read by ``proj`` at every
    scale's values; the stream it reads and the space ``proj`` writes (added into the stream) prunable. The cut
    network, smaller in its aggregation's groups, computes the masked one."""
    graph = trace_channel_graph(tiny_efficientvit_mit())
    attention = "stages.3.blocks.2.context_module.main"
    heads = space_of(graph, f"{attention}.qkv.conv")
    assert heads.prunable and heads.block == 3 * 8, heads.refusals
    assert heads.names == [f"{attention}.qkv.conv", f"{attention}.aggreg.0.0", f"{attention}.aggreg.0.1"]
    head = heads.consumers[1].at[2 * 8 : 3 * 8 * 2]  # the second scale's columns of the first head's values, then -1s
    assert list(head[:8]) == list(range(32, 40)) and set(head[8:16]) == {-1}
    assert space_of(graph, f"{attention}.proj.conv").prunable
    assert_cut_equals_masked(tiny_efficientvit_mit(), 64)


def test_mobilevit_block_is_read_as_its_insides_and_cuts_exactly() -> None:
    """MobileViT's block (kept whole by timm): its transformer's width one space from ``conv_1x1`` through every
    ViT block's residuals to ``conv_proj``, its heads whole, ``conv_fusion`` reading the block's input and
    ``conv_proj``'s output side by side."""
    model = timm.create_model("mobilevit_xxs", num_classes=10)
    graph = trace_channel_graph(model)
    block = "stages.3.1"
    stream = space_of(graph, f"{block}.conv_1x1")
    assert {f"{block}.transformer.0.attn.proj", f"{block}.transformer.3.mlp.fc2"} <= set(stream.names)
    assert space_of(graph, f"{block}.transformer.0.attn.qkv").whole_heads
    fusion_reads = {consumer.name: consumer.offset for consumer in space_of(graph, f"{block}.conv_proj.conv").consumers}
    assert fusion_reads == {f"{block}.conv_fusion.conv": 64}  # after the block's 64 input channels
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    assert_cut_equals_masked(model, 64)


def tiny_tiny_vit() -> nn.Module:
    from timm.models.tiny_vit import TinyVit

    torch.manual_seed(0)
    return TinyVit(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(3, 3, 3, 2),
                   mlp_ratio=2, drop_path_rate=0.0, num_classes=10)  # fmt: skip


def test_tiny_vit_block_is_read_as_its_insides_and_cuts_exactly() -> None:
    """TinyViT's block (kept whole by timm): one stream through its window attention (padded windows of 3 on maps of
    4 and 2 px), its depthwise ``local_conv`` and its MLP; the attention's heads (q, k, v side by side) cut whole,
    with their rows of the bias table, and the cut sets the head count and ``out_dim``."""
    graph = trace_channel_graph(tiny_tiny_vit())
    block = "stages.1.blocks.1"
    stream = space_of(graph, f"{block}.attn.proj")
    assert {f"{block}.local_conv.conv", f"{block}.mlp.fc2", "stages.1.blocks.0.attn.proj"} <= set(stream.names)
    assert stream.prunable and space_of(graph, f"{block}.mlp.fc1").prunable
    heads = space_of(graph, f"{block}.attn.qkv")
    assert heads.prunable and heads.block == 3 * 8 and heads.scales[0].at[:25] == (0,) * 24 + (1,), heads.refusals
    torch.manual_seed(0)
    model = randomize_norms(tiny_tiny_vit()).eval()
    images = torch.randn(2, 3, 64, 64)
    masked, compaction = masked_and_cut(model, images)
    attention = compaction.model.get_submodule(f"{block}.attn")
    assert (attention.num_heads, attention.out_dim, attention.attention_biases.shape[0]) == (1, 8, 1)
    with torch.no_grad():
        assert torch.allclose(compaction.model(images), masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())


class Residual(nn.Module):
    """A stem conv, ``x + attention(x)`` and a pooled classifier: the smallest network an attention on a map sits in."""

    def __init__(self, attention: nn.Module, width: int) -> None:
        super().__init__()
        self.stem, self.attention = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)), attention
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.attention(x)
        return self.head(x.mean((2, 3)))


def conv_attention(module: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    attention = importlib.import_module(f"timm.models.{module}").ConvAttention
    return Residual(attention(32, att_stride=2, att_kernel=3, **options), 32)


@pytest.mark.parametrize(
    ("module", "options", "writers"),
    [
        ("lowformer", {}, ["attention.o_proj", "attention.upsampling"]),  # a depthwise transposed conv upsamples
        ("cpubone", {"fuse_out_proj": True, "upsample_mode": "nearest"}, ["attention.upsampling.0"]),
        ("cpubone", {"upsample_mode": "nearest"}, ["attention.o_proj"]),
    ],
)
def test_conv_attention_carries_its_input_and_upsampled_output_and_cuts_exactly(
    module: str, options: dict[str, object], writers: list[str]
) -> None:
    """LowFormer's and CPUBone's ``ConvAttention``: its strided depthwise ``conv_proj`` joins the stream it reads,
    its output is written by a 1 × 1 conv and carried by what upsamples it, added into the stream."""
    graph = trace_channel_graph(conv_attention(module, **options))
    stream = space_of(graph, "stem.0")
    assert stream.prunable and {"attention.conv_proj.conv", *writers} <= set(stream.names), stream.names
    assert not space_of(graph, "attention.pwise").prunable
    assert_cut_equals_masked(conv_attention(module, **options), 16)
