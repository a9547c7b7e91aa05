"""MobileNetV5 on a tiny configuration (widths of 8 to 56, two multi-query attentions, seconds): its multi-query
attention's key dims cut at the same positions in every head and in its one key head, its value width cut, its
multi-scale fusion adapter's concatenation and FFN cut; half of every prunable space masked (L1, ``activation``) and
cut gives the masked network's function."""

from __future__ import annotations

import pytest
import torch
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from torch import nn

from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)

ATTENTIONS = ("blocks.2.1.attn", "blocks.3.1.attn")  # keys and values downsampled (kv_stride 2) in the first


def tiny_mobilenetv5() -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv5 import MobileNetV5

    arch = [["er_r1_k3_s2_e4_c8"], ["uir_r1_a3_k5_s2_e4_c16"],
            ["uir_r1_a3_k5_s2_e4_c24", "mqa_r1_k3_h4_v2_s1_d8_c24", "uir_r1_a0_k0_s1_e2_c24"],
            ["uir_r1_a5_k5_s2_e4_c32", "mqa_r1_k3_h4_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]  # fmt: skip
    torch.manual_seed(0)
    model = MobileNetV5(decode_arch_def(arch), num_classes=10, stem_size=8, num_features=48,
                        msfa_output_resolution=2, layer_scale_init_value=1e-5)  # fmt: skip
    for name, parameter in model.named_parameters():  # layer scales of 1e-5 would hide a wrong cut in rounding
        if name.endswith("gamma"):
            nn.init.uniform_(parameter, 0.5, 2.0)
    return model


def test_multi_query_attention_cuts_key_dims_in_every_head_and_its_values() -> None:
    """``MultiQueryAttention2d`` was traced into and refused at ``scaled_dot_product_attention`` and ``unsqueeze``:
    every head's q rows meet the one key head's rows dim for dim, so a key dim is cut from k and from q in every
    head (k's space, q's rows its points once per head); the one value head is read by ``output.proj`` once per
    head. The cut sets ``key_dim`` and ``value_dim`` and computes the masked network."""
    graph = trace_channel_graph(tiny_mobilenetv5())
    for attention in ATTENTIONS:
        keys, values = space_of(graph, f"{attention}.key.proj"), space_of(graph, f"{attention}.value.proj")
        assert keys.prunable and values.prunable, (keys.refusals, values.refusals)
        assert (attention, "key_dim") in keys.held_by and (attention, "value_dim") in values.held_by
        assert sum(point.name == f"{attention}.query.proj" for point in keys.points) == 4  # once per head
        reads = sorted(consumer.at[0] for consumer in values.consumers if consumer.name == f"{attention}.output.proj")
        assert reads == [0, 8, 16, 24]  # value 0 in each head's columns
    stream = space_of(graph, "blocks.2.0.pw_proj.conv")  # read by the downsampling depthwise convs, which carry it
    assert {f"{ATTENTIONS[0]}.key.down_conv", f"{ATTENTIONS[0]}.value.down_conv"} <= set(stream.names)
    cut = assert_cut_equals_masked(tiny_mobilenetv5(), 64).model
    for attention in map(cut.get_submodule, ATTENTIONS):
        assert attention.key_dim < 8 and attention.value_dim < 8
        assert attention.query.proj.out_channels == 4 * attention.key_dim and attention.num_heads == 4


def test_multi_scale_fusion_adapter_cuts_its_inputs_and_its_ffn() -> None:
    """The MSFA (kept whole by timm) was not understood: the two last stages it concatenates, its FFN and everything
    after were refused. Its inputs (resized per channel) are whole spaces side by side read by the FFN's ``pw_exp``,
    its FFN's widths are spaces, its norm a point of ``pw_proj``'s."""
    graph = trace_channel_graph(tiny_mobilenetv5())
    for layer in ("blocks.2.2.pw_proj.conv", "blocks.3.2.pw_proj.conv", "msfa.ffn.pw_exp.conv",
                  "msfa.ffn.pw_proj.conv"):  # fmt: skip
        assert space_of(graph, layer).prunable, (layer, space_of(graph, layer).refusals)
    exp = [consumer for consumer in space_of(graph, "blocks.3.2.pw_proj.conv").consumers
           if consumer.name == "msfa.ffn.pw_exp.conv"]  # fmt: skip
    assert [consumer.offset for consumer in exp] == [24]  # after the 24 channels of the third stage
    assert [space.name for space in graph.spaces if not space.prunable] == ["classifier"], [
        (space.name, space.refusals) for space in graph.spaces if not space.prunable
    ]
    ffn = assert_cut_equals_masked(tiny_mobilenetv5(), 64).model.msfa.ffn
    assert ffn.pw_exp.conv.in_channels < 24 + 32 and ffn.pw_exp.conv.out_channels < 112
    assert ffn.pw_proj.conv.out_channels < 48


def test_a_fusion_adapter_with_more_in_its_ffn_refuses_its_inputs_in_one_line() -> None:
    """An FFN with a layer scale (or a depthwise conv, an SE gate, a skip) is not read: its inputs are refused naming
    the adapter and the part, and the rest is still cut exactly."""
    from timm.layers import LayerScale2d

    def scaled_ffn() -> nn.Module:
        model = tiny_mobilenetv5()
        model.msfa.ffn.layer_scale = LayerScale2d(48, 1.0)
        return model

    refused = {space.name: space.refusals for space in trace_channel_graph(scaled_ffn()).spaces if not space.prunable}
    assert set(refused) == {"classifier", "blocks.2.0.pw_proj.conv", "blocks.3.0.pw_proj.conv"}, refused
    assert refused["blocks.3.0.pw_proj.conv"] == ["fusion adapter msfa has a layer_scale in its FFN, which is not read"]
    assert_cut_equals_masked(scaled_ffn(), 64)


class StridedQueries(nn.Module):
    """MobileNetV4-hybrid's attention: queries pooled and normalised (``query_strides`` 2), keys and values
    downsampled (``kv_stride`` 2), BatchNorms, separate key and value widths, in a small conv net."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.attention2d import MultiQueryAttention2d

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.attn = MultiQueryAttention2d(16, num_heads=4, key_dim=4, value_dim=6, query_strides=2, kv_stride=2)
        self.head = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 5))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.attn(x))


def test_strided_queries_are_normalised_over_the_input_and_cut_exactly() -> None:
    """A pooled query is normalised over the attention's input (``query.norm``, a point of its space, masked again
    after its β), its output upsampled per channel before ``output.proj``."""
    torch.manual_seed(0)
    graph = trace_channel_graph(StridedQueries())
    stream = space_of(graph, "stem.0")
    assert stream.prunable and "attn.query.norm" in [point.name for point in stream.points], stream.refusals
    assert space_of(graph, "attn.key.proj").prunable and space_of(graph, "attn.value.proj").prunable
    torch.manual_seed(0)
    cut = assert_cut_equals_masked(StridedQueries(), 16).model
    assert cut.attn.query.norm.num_features < 16 and cut.attn.key_dim < 4 and cut.attn.value_dim < 6


def test_a_fresh_mobilenetv5_given_the_cut_sizes_computes_the_cut_network() -> None:
    """A checkpoint of the cut network loads into a fresh one given the cut's sizes (``apply_sizes``): its attentions'
    ``key_dim``, ``value_dim`` and fused path set as attributes."""
    from pruneflow.compaction.cut import apply_sizes

    cut = assert_cut_equals_masked(tiny_mobilenetv5(), 64)
    fresh = apply_sizes(tiny_mobilenetv5(), cut.sizes).eval()
    fresh.load_state_dict(cut.model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(images), cut.model.eval()(images))
