"""LeViT's attentions (token mode) cut in whole heads on a tiny config: a head's q, k and v rows side by side in
``qkv``, its row of ``attention_biases`` and ``proj``'s columns for its values go together; masked = cut."""

from __future__ import annotations

import pytest
import torch
from test_timm_ghost_levit import tiny_levit  # skips where timm is missing
from test_window_attention import masked_and_cut

from pruneflow.compaction.cut import Compaction, apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

pytest.importorskip("timm")


def cut_computes_the_masked() -> Compaction:
    """A tiny LeViT (norms randomised: a leaking mask would show) masked and cut; the cut computes the masked."""
    torch.manual_seed(0)
    model = randomize_norms(tiny_levit()).eval()
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction


def test_a_fresh_levit_given_the_cut_sizes_computes_the_cut_network() -> None:
    """What a checkpoint written after the cut and an exported model load through (``apply_sizes``): the head counts
    and value widths (``val_attn_dim``) set on a fresh model, the cut's weights then fit and compute the same."""
    compaction = cut_computes_the_masked()
    fresh = apply_sizes(tiny_levit().eval(), compaction.sizes)
    fresh.load_state_dict(compaction.model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), compaction.model(images))


def test_levit_attention_heads_are_pruned_whole_and_cut_exactly() -> None:
    graph = trace_channel_graph(tiny_levit().eval())
    rows = next(space for space in graph.spaces if "stages.0.blocks.0.attn.qkv.linear" in space.names)
    assert rows.prunable, rows.refusals
    assert rows.block == 2 * 4 + 8 and rows.heads_of == "stages.0.blocks.0.attn"  # q, k (key_dim 4), v (val_dim 8)
    assert {scale.name for scale in rows.scales} == {"stages.0.blocks.0.attn.attention_biases"}
    compaction = cut_computes_the_masked()
    for name, heads in (("stages.0.blocks.0.attn", 2), ("stages.1.blocks.0.attn", 3)):
        attention = compaction.model.get_submodule(name)
        assert attention.num_heads < heads and attention.val_attn_dim == attention.num_heads * attention.val_dim
        assert attention.attention_biases.shape[0] == attention.num_heads


def test_levit_downsampling_attention_heads_take_their_queries_with_them_and_cut_exactly() -> None:
    """``AttentionDownsample``: ``kv`` writes each head's k and v side by side, pruned in whole heads; its separate
    ``q.ln`` (Linear and BatchNorm1d) loses the rows of those heads' queries, read at the k positions."""
    name = "stages.1.downsample.attn_downsample"
    graph = trace_channel_graph(tiny_levit().eval())
    rows = next(space for space in graph.spaces if f"{name}.kv.linear" in space.names)
    assert rows.prunable, rows.refusals
    assert rows.block == 4 + 16 and rows.heads_of == name  # k (key_dim 4), v (val_dim 16)
    assert {point.name for point in rows.points} == {f"{name}.q.ln.linear", f"{name}.q.ln.bn"}
    assert not any(f"{name}.q.ln.linear" in space.names for space in graph.spaces)
    compaction = cut_computes_the_masked()
    attention = compaction.model.get_submodule(name)
    assert attention.num_heads < 4 and attention.val_attn_dim == attention.num_heads * attention.val_dim
    assert attention.q.ln.linear.out_features == attention.q.ln.bn.num_features == attention.num_heads * 4
