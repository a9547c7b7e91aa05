"""GCViT (timm's ``GlobalContextVit``, issue 31) on a tiny config: window attentions whose query is the stage's
global query (the stream after the stage's MbConv feature block) alternating with Swin-like ones, a conv stem and
downsamplers with squeeze-excite. The stage streams, the MLPs' hidden widths and the attentions' heads are cut, and
the cut computes the masked network's function (measured on the logits)."""

from __future__ import annotations

import pytest
import torch
from test_channel_graph import check_masked_and_cut
from test_timm_attention_classes import STRATEGIES
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import Tensor, nn

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_gcvit(layer_scale: float | None = None) -> nn.Module:
    """Two stages at 32 px, windows of 4 × 4: 16 channels in 2 heads, then 32 in 4 (heads of 8); each stage a local
    and a global-query block; the first stage's feature block pools once, the second's not at all."""
    from timm.models.gcvit import GlobalContextVit

    torch.manual_seed(0)
    return GlobalContextVit(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), mlp_ratio=2,
                            layer_scale=layer_scale, num_classes=10)  # fmt: skip


def test_gcvit_streams_heads_and_mlps_are_prunable() -> None:
    graph = trace_channel_graph(tiny_gcvit())
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.fc"]
    for stage, (stream_name, heads) in enumerate((("stem.down.reduction", 2), ("stages.1.downsample.reduction", 4))):
        stream = space_of(graph, stream_name)
        # the global query is the stream: its attention's key and value rows go with the stream's channels
        assert {f"stages.{stage}.blocks.1.attn.proj", f"stages.{stage}.global_block.blocks.conv1.conv_pw"} <= set(
            stream.names
        )
        assert [(p.name, p.offset) for p in stream.points if p.name.endswith("attn.qkv")] == [
            (f"stages.{stage}.blocks.1.attn.qkv", 0),
            (f"stages.{stage}.blocks.1.attn.qkv", stream.width),
        ]
        assert stream.groups % heads == 0  # as many query positions in every head
        local = space_of(graph, f"stages.{stage}.blocks.0.attn.qkv")  # Swin's: tied to the stream
        assert local.heads == heads and local.tied_to is stream
        assert space_of(graph, f"stages.{stage}.blocks.1.mlp.fc1").prunable


def test_gcvit_with_layer_scales_cut_computes_the_masked_network() -> None:
    assert_cut_equals_masked(tiny_gcvit(layer_scale=0.5), 32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gcvit_masks_reach_every_reader_and_every_strategy_cuts(strategy: str) -> None:
    """``activation``: no reader receives a masked channel (``proj`` the global attention's heads' output), pruned
    rows get no gradient, the cut computes the masked network; every other strategy applies, trains and cuts."""
    check_masked_and_cut(tiny_gcvit(layer_scale=0.5), (3, 32, 32), strategy)


def test_gcvit_cut_sets_head_widths_and_a_fresh_model_given_its_sizes_loads_it() -> None:
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(randomize_norms(tiny_gcvit()).eval(), images)
    cut = compaction.model
    with torch.no_grad():
        assert torch.allclose(cut(images), masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())
    for stage, heads in enumerate((2, 4)):
        for block in cut.stages[stage].blocks:
            width = block.norm1.normalized_shape[0]
            assert width < cut.stages[stage].dim and block.attn.head_dim * heads == width
            assert block.attn.num_heads == heads
    rebuilt = apply_sizes(tiny_gcvit(), compaction.sizes).eval()
    rebuilt.load_state_dict(cut.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(images), cut(images))


class ForeignQuery(nn.Module):
    """A global-query attention given a query that is not its input's channels as they are: a Linear's of its own
    (``"foreign"``), or its input's after a sigmoid, which turns a masked channel's 0 into 0.5 (``"revived"``)."""

    def __init__(self, query: str) -> None:
        from timm.models.gcvit import WindowAttentionGlobal

        super().__init__()
        self.embed, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 10)
        self.query = nn.Linear(16, 16) if query == "foreign" else nn.Sigmoid()
        self.attn = WindowAttentionGlobal(16, num_heads=2, window_size=4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # 16 tokens: one window
        batch, _, width = x.shape
        x = x + self.attn(x, self.query(x).reshape(batch, 4, 4, width))
        return self.head(x.mean(1))


@pytest.mark.parametrize("query", ["foreign", "revived"])
def test_a_global_query_other_than_the_input_is_refused_in_one_line(query: str) -> None:
    graph = trace_channel_graph(ForeignQuery(query))
    reason = "global window attention attn reads a global query whose channels are not its input's"
    assert all(reason in space_of(graph, name).refusals for name in ("embed", "attn.proj"))
    if query == "foreign":
        assert reason in space_of(graph, "query").refusals
