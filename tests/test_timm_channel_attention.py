"""timm's attentions that mix tokens by their channels' statistics, kept whole: SwiftFormer's additive attention
(an L2 normalisation over the channels, a learned ``w_g``). Each is traced on a tiny network, half of every space
masked by ``activation`` and cut, and the cut network compared with the masked one."""

from __future__ import annotations

import pytest
import torch
from test_graph_cnn_rules import OUTPUT, conv_bn, head, refusals
from test_graph_defects import assert_cut_equals_masked
from torch import Tensor, nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

swiftformer = pytest.importorskip("timm.models.swiftformer")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


class AdditiveBlock(nn.Module):
    """A conv stem, SwiftFormer's additive attention added to the stream, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.attn, self.head = conv_bn(3, 8), swiftformer.EfficientAdditiveAttention(8, 8), head(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x))


def test_the_additive_attentions_query_key_and_proj_rows_are_one_space_cut_exactly() -> None:
    graph = trace_channel_graph(AdditiveBlock())
    rows = next(space for space in graph.spaces if "attn.to_query" in space.names)
    assert rows.prunable and set(rows.names) == {"attn.to_query", "attn.to_key", "attn.proj"}
    assert {consumer.name for consumer in rows.consumers} == {"attn.proj", "attn.final"}
    assert [(scale.name, scale.dim) for scale in rows.scales] == [("attn.w_g", 0)]
    assert refusals(AdditiveBlock()) == [OUTPUT]
    assert_cut_equals_masked(AdditiveBlock())


def test_a_tiny_swiftformer_masked_and_cut_computes_the_masked_network() -> None:
    torch.manual_seed(0)
    model = swiftformer.SwiftFormer(layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_classes=10,
                                    layer_scale_init_value=1.0)  # fmt: skip
    unpruned = [space.refusals for space in trace_channel_graph(randomize_norms(model)).spaces if not space.prunable]
    assert unpruned == [OUTPUT]
    assert_cut_equals_masked(model)
