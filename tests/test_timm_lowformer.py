"""LowFormer's ``ConvAttention`` with ``fuse_out_proj``: its output written by a dense transposed conv (its output
channels along its weight's dim 1), a producer of the stream it is added into; small (seconds): half of every
prunable space masked by L1 with ``activation`` and cut, the cut network equal to the masked one."""

from __future__ import annotations

import copy

import pytest
import torch
from test_timm_mobile_attention import conv_attention
from test_window_attention import masked_and_cut

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

pytest.importorskip("timm")


def test_a_dense_transposed_conv_writing_the_attentions_output_is_a_producer_of_the_stream() -> None:
    """It was refused with the stream (lowformer_b0 1.93x: its last two stages' streams)."""
    graph = trace_channel_graph(conv_attention("lowformer", fuse_out_proj=True))
    stream = next(space for space in graph.spaces if "stem.0" in space.names)
    assert stream.prunable and "attention.upsampling" in stream.names, stream.refusals
    torch.manual_seed(0)
    model, images = randomize_norms(conv_attention("lowformer", fuse_out_proj=True)).eval(), torch.randn(2, 3, 16, 16)
    masked, compaction = masked_and_cut(model, images)
    upsampling = compaction.model.attention.upsampling
    assert (upsampling.in_channels, upsampling.out_channels, upsampling.weight.shape[:2]) == (16, 16, (16, 16))
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    fresh = copy.deepcopy(model)
    apply_sizes(fresh, compaction.sizes).load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images), cut)
