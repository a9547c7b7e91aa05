"""MaxViT's window and grid attention (issue 23): the embedding width as one coupled space through each layer.

torchvision's ``PartitionAttentionLayer`` partitions its input into windows (or a grid), adds a relative-position
attention and an MLP to it, each after a LayerNorm, and puts the windows back. The graph keeps it whole (a leaf):
the stream it reads is written again by the attention's ``merge`` and the MLP's second layer, read by ``to_qkv``
and the MLP's first layer, normalised by both LayerNorms; ``to_qkv``'s q, k, v rows are a space tied to the
stream, as Swin's are. The attention reshapes by a head width of its own (``head_dim``), which the cut sets, and
scales by its original width, which it keeps: the cut network computes the masked one without any rescaling.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_channel_graph import check_masked_and_cut, space_of
from test_window_attention import masked_and_cut

from pruneflow.compaction import effective_copy, export_compact, load_compact
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

STRATEGIES = ["activation", "weight", "gradient", "hard", "parametrize", "control"]
TINY = {"input_size": [32, 32], "stem_channels": 16, "partition_size": 2, "block_channels": [16, 32],
        "block_layers": [1, 1], "head_dim": 8, "stochastic_depth_prob": 0.0, "num_classes": 10}  # fmt: skip


def tiny_maxvit() -> torch.nn.Module:
    """Two stages of torchvision's MaxViT (MBConv, window and grid attention): 2 and 4 heads of width 8."""
    return torchvision.models.maxvit.MaxVit(**TINY)


def test_each_stage_is_one_coupled_space_through_its_attention_layers_with_their_heads_tied_to_it() -> None:
    graph = trace_channel_graph(tiny_maxvit())
    first = "blocks.0.layers.0.layers"
    stream = space_of(graph, f"{first}.MBconv.proj.1")
    assert stream.prunable and stream.coupled and stream.multiple == 2
    for name in ("MBconv.layers.conv_c", "window_attention.attn_layer.1.merge", "grid_attention.mlp_layer.3"):
        assert f"{first}.{name}" in stream.names
    points = {point.name for point in stream.points}
    assert {f"{first}.window_attention.attn_layer.0", f"{first}.grid_attention.mlp_layer.0"} <= points
    heads = space_of(graph, f"{first}.window_attention.attn_layer.1.to_qkv")
    assert (
        heads.heads == 2 and heads.tied_to is stream and heads.head_width_of == f"{first}.window_attention.attn_layer.1"
    )
    # the last stage reaches the classifier's LayerNorm through a global pooling: (N, C), a channel point too
    assert "classifier.2" in {point.name for point in space_of(graph, "blocks.1.layers.0.layers.MBconv.proj.1").points}
    assert [space.name for space in graph.spaces if not space.prunable] == ["classifier.5"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_maxvit_masks_exactly_and_cuts_to_the_masked_function(strategy: str) -> None:
    check_masked_and_cut(tiny_maxvit(), (3, 32, 32), strategy)


def test_the_cut_sets_each_attentions_head_width_and_a_rebuilt_model_has_it_too(tmp_path) -> None:
    torch.manual_seed(0)
    model = randomize_norms(tiny_maxvit()).eval()
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    attention = compaction.model.blocks[0].layers[0].layers.window_attention.attn_layer[1]
    assert (attention.n_heads, attention.head_dim, attention.to_qkv.out_features) == (2, 4, 24)
    assert attention.scale_factor == 16**-0.5  # its original width's: the masked network's scale
    with torch.no_grad():
        assert (compaction.model(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
        paths = export_compact(
            compaction, (3, 32, 32), tmp_path, {"_target_": "torchvision.models.maxvit.MaxVit", **TINY}
        )
        rebuilt = load_compact(paths["state"])
        assert rebuilt.blocks[0].layers[0].layers.window_attention.attn_layer[1].head_dim == 4
        assert (rebuilt(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
    ratio = count_flops(effective_copy(model), images[:1]) / count_flops(compaction.model, images[:1])
    assert ratio >= 3.0, ratio


@pytest.mark.slow
def test_maxvit_t_at_224_cuts_at_least_3x_the_flops_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.maxvit_t(num_classes=10)).eval()
    images = torch.randn(2, 3, 224, 224)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        assert (compaction.model(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(effective_copy(model), images[:1]) / count_flops(compaction.model, images[:1]) >= 3.0
