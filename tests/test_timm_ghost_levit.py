"""timm's GhostNet (a GhostModule's ``[x1, cheap(x1)]`` copies of one space in residuals and SE gates) and LeViT
(``LinearNorm``, its stream pruned; its attentions' heads: ``test_timm_levit_heads``), on tiny configs: traced,
masked = cut."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
from timm.models.ghostnet import GhostNet  # noqa: E402
from timm.models.levit import Levit  # noqa: E402


def tiny_ghostnet() -> nn.Module:
    """An identity shortcut, a shortcut conv (stride 2, widening) and an SE gate over a GhostModule's copies."""
    stages = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0, 2]], [[3, 72, 24, 0.25, 1]], [[5, 72, 40, 0.25, 2]]]
    return GhostNet(stages, num_classes=10, width=0.5, drop_rate=0.0)


def tiny_levit() -> nn.Module:
    return Levit(img_size=32, num_classes=10, embed_dim=(16, 24), key_dim=4, depth=(1, 1), num_heads=(2, 3))


def assert_cut_equals_masked(model: nn.Module, size: int) -> tuple[int, int]:
    """The cut of half of every space by L1 equals the masked network on random images; (channels before, after)."""
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    images = torch.randn(2, 3, size, size)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction.channels


def test_ghost_module_copies_join_residuals_shortcut_convs_and_se_gates() -> None:
    """Each block's output ``[x1, cheap(x1)]`` is one space twice: added to the block's input (copies too) it joins
    that space; the stem's rows j and n + j (read by the first block too) are cut with its channel j, as a shortcut
    conv's are (folded)."""
    graph = trace_channel_graph(tiny_ghostnet().eval())
    assert [space.name for space in graph.spaces if not space.prunable] == ["classifier"]
    first = next(space for space in graph.spaces if "blocks.0.0.ghost2.primary_conv.0" in space.names)
    stem = sorted(point.at for point in first.points if point.name == "conv_stem")
    assert stem == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert {"blocks.0.0.ghost1.primary_conv.0", "blocks.1.0.shortcut.2"} <= {c.name for c in first.consumers}
    stream = next(space for space in graph.spaces if "blocks.3.0.ghost2.primary_conv.0" in space.names)
    shortcut = sorted(point.offset for point in stream.points if point.name == "blocks.3.0.shortcut.2")
    assert shortcut == [0, 10]
    torch.manual_seed(0)
    total, kept = assert_cut_equals_masked(tiny_ghostnet(), 32)
    assert kept < total


def test_levit_stream_and_attention_rows_are_pruned() -> None:
    graph = trace_channel_graph(tiny_levit().eval())
    refused = {space.name: space.refusals for space in graph.spaces if not space.prunable}
    assert refused == {"head.linear": ["reaches the network's output, whose shape would change"]}
    stream = next(space for space in graph.spaces if "stem.conv4.linear" in space.names)
    assert {"stages.0.blocks.0.attn.proj.ln.linear", "stages.0.blocks.0.mlp.ln2.linear"} <= set(stream.names)
    mlp = next(space for space in graph.spaces if "stages.0.blocks.0.mlp.ln1.linear" in space.names)
    assert mlp.prunable and mlp.producers[0].norm_name == "stages.0.blocks.0.mlp.ln1.bn"
    total, kept = assert_cut_equals_masked(tiny_levit(), 32)
    assert kept < total
