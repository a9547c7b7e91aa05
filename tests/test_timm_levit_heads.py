"""LeViT's attentions (token mode) cut in whole heads on a tiny config: a head's q, k and v rows side by side in
``qkv``, its row of ``attention_biases`` and ``proj``'s columns for its values go together; masked = cut."""

from __future__ import annotations

import pytest
import torch
from test_timm_ghost_levit import tiny_levit  # skips where timm is missing
from test_window_attention import masked_and_cut

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

pytest.importorskip("timm")


def test_levit_attention_heads_are_pruned_whole_and_cut_exactly() -> None:
    graph = trace_channel_graph(tiny_levit().eval())
    rows = next(space for space in graph.spaces if "stages.0.blocks.0.attn.qkv.linear" in space.names)
    assert rows.prunable, rows.refusals
    assert rows.block == 2 * 4 + 8 and rows.heads_of == "stages.0.blocks.0.attn"  # q, k (key_dim 4), v (val_dim 8)
    assert {scale.name for scale in rows.scales} == {"stages.0.blocks.0.attn.attention_biases"}
    torch.manual_seed(0)
    model = randomize_norms(tiny_levit()).eval()
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    for name, heads in (("stages.0.blocks.0.attn", 2), ("stages.1.blocks.0.attn", 3)):
        attention = compaction.model.get_submodule(name)
        assert attention.num_heads < heads and attention.val_attn_dim == attention.num_heads * attention.val_dim
        assert attention.attention_biases.shape[0] == attention.num_heads
