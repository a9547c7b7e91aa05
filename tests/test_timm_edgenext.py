"""EdgeNeXt's SDTA blocks (``SplitTransposeBlock``): the stream chunked into scales, a depthwise conv on each, one
scale's conv output added to the next part, the parts concatenated back, a per-channel layer scale on the stream. A
tiny EdgeNeXt (seconds), half of every prunable space masked by ``activation`` and cut, the cut equal to the masked
network."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

edgenext = pytest.importorskip("timm.models.edgenext")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_edgenext(dims: tuple[int, ...] = (16, 24, 36, 48)) -> nn.Module:
    """Four stages, an SDTA block in the last three, in 2, 3 and 4 scales (12 channels each with the default dims)."""
    torch.manual_seed(0)
    return edgenext.EdgeNeXt(depths=(1, 1, 2, 1), dims=dims, heads=(2, 2, 2, 2), global_block_counts=(0, 1, 1, 1),
                             d2_scales=(2, 2, 3, 4), num_classes=10, ls_init_value=1.0)  # fmt: skip


def test_the_sdta_scales_are_cut_at_the_same_positions_in_each_part() -> None:
    """Its streams were refused at the chunk into scales (reordered and scaled by ``gamma``) and at the adds of one
    scale's conv output to the next part (edgenext_xx_small 1.80x)."""
    model = randomize_norms(tiny_edgenext())
    spaces = trace_channel_graph(model).spaces
    assert [space.refusals for space in spaces if not space.prunable] == [
        ["reaches the network's output, whose shape would change"]]
    streams = {space.names[0]: space.groups for space in spaces if "downsample" in space.names[0]}
    assert streams == {"stages.1.downsample.1": 2, "stages.2.downsample.1": 3, "stages.3.downsample.1": 4}
    assert_cut_equals_masked(tiny_edgenext())


def assert_cut_equals_masked(model: nn.Module) -> None:
    """Half of every space masked and cut at 32 px (its stem patchifies by 4, each stage downsamples by 2)."""
    torch.manual_seed(0)
    model, images = randomize_norms(model).eval(), torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()


def test_scales_of_unequal_widths_are_refused_in_one_line() -> None:
    """edgenext_xx_small's third stage chunks 88 channels into 3 scales of 30, 30 and 28: it crashed the cut."""
    model = tiny_edgenext(dims=(16, 24, 32, 48))
    stream = next(space for space in trace_channel_graph(model).spaces if "stages.2.downsample.1" in space.names)
    unequal = ".chunk() at chunk_1 splits them into unequal parts [11, 11, 10], cut in step by no rule"
    assert stream.refusals[0] == unequal
    assert_cut_equals_masked(tiny_edgenext(dims=(16, 24, 32, 48)))
