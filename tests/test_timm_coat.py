"""CoaT (timm) on tiny configs built in seconds: its factorised attention's heads tied to the stream and cut at the
same positions in q, k and v with its convolutional relative position encoding, each stage's stream through the
reshape to the next stage's patch embedding, and its parallel blocks' scales; half of every prunable space masked by
L1 with ``activation`` and cut, the cut network equal to the masked one."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import ChannelGraph, ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_coat(parallel_depth: int = 0) -> nn.Module:
    """Four stages of 16 channels, 4 heads of 4, the encoding's windows over runs of 2 heads (3 × 3, then 5 × 5)."""
    from timm.models.coat import CoaT

    torch.manual_seed(0)
    model = CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 2, 1, 1),
                 parallel_depth=parallel_depth, num_heads=4, mlp_ratios=(2, 2, 2, 2), crpe_window={3: 2, 5: 2},
                 num_classes=5)  # fmt: skip
    for parameter in model.parameters():  # timm's init leaves biases 0: a wrongly cut bias would go unnoticed
        parameter.data.normal_(0, 0.3)
    return randomize_norms(model).eval()


def space_of(graph: ChannelGraph, name: str) -> ChannelSpace:
    return next(space for space in graph.spaces if name in space.names)


def assert_cut_computes_the_masked_network(model: nn.Module) -> dict[str, dict[str, int]]:
    """Half of every space masked and cut: the cut network's logits equal the masked one's (scale-relative), and
    it is narrower; the cut's sizes."""
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction.sizes


def test_factorised_attention_heads_are_tied_to_the_stream_and_cut_with_the_encoding() -> None:
    """The attention was refused at ``.reshape()``/``.unbind()`` of q/k/v and the encoding's depthwise convs, and
    the stream at the reshape to the next stage (coat_tiny 1.45x)."""
    model = tiny_coat()
    graph = trace_channel_graph(model)
    stream = space_of(graph, "patch_embed1.proj")
    assert stream.prunable and stream.multiple == 4, stream.refusals
    heads = space_of(graph, "serial_blocks1.0.factoratt_crpe.qkv")
    assert heads.prunable and heads.tied_to is stream and heads.heads == 4 and heads.groups == 3, heads.refusals
    assert [(point.name, point.at.index(0)) for point in heads.points] == [
        ("crpe1.conv_list.0", 32), ("crpe1.conv_list.1", 40)]  # fmt: skip
    shared = space_of(graph, "serial_blocks2.0.factoratt_crpe.qkv")  # two attentions sharing crpe2: one space
    assert shared.names == ["serial_blocks2.0.factoratt_crpe.qkv", "serial_blocks2.1.factoratt_crpe.qkv"]
    sizes = assert_cut_computes_the_masked_network(model)
    assert sizes["crpe1"] == {"channel_splits": (4, 4)}  # 2 heads of 2 positions in each run
    assert sizes["crpe1.conv_list.1"]["out_channels"] == 4
    assert sizes["serial_blocks1.0.factoratt_crpe.qkv"]["out_features"] == 24


def test_unequal_query_key_and_value_positions_are_not_cut() -> None:
    """Output position j reads q's position j through the encoding (``q_j · conv(v)_j``): a cut taking other
    positions from q than from v would differ from the masked network, so the cut refuses it."""
    from pruneflow.compaction import CompactionError, compact

    model = tiny_coat()
    graph = trace_channel_graph(model)
    heads = space_of(graph, "serial_blocks1.0.factoratt_crpe.qkv")
    pruned = torch.zeros(heads.width, dtype=torch.bool)
    pruned[[0, 4, 8, 12, 16 + 1, 16 + 5, 16 + 9, 16 + 13, 32 + 2, 32 + 6, 32 + 10, 32 + 14]] = True
    stream = torch.zeros(16, dtype=torch.bool)
    stream[[0, 1, 2, 3]] = True
    masks = {name: stream for name in space_of(graph, "patch_embed1.proj").names}
    masks["serial_blocks1.0.factoratt_crpe.qkv"] = pruned
    with pytest.raises(CompactionError, match="same positions from every group"):
        compact(model, masks)


def test_parallel_blocks_scales_and_the_aggregated_class_tokens_are_cut() -> None:
    """The scales' streams, one space through the parallel blocks' resampled sums, were refused at ``torch.stack``
    of their class tokens, ``.squeeze()`` and the ``aggregate`` conv over them, whose bias revives a masked channel
    before the classifier: it is masked again at its output (a point without entries, which the cut keeps)."""
    model = tiny_coat(parallel_depth=1)
    graph = trace_channel_graph(model)
    scales = space_of(graph, "patch_embed2.proj")
    assert scales.prunable and {"patch_embed3.proj", "patch_embed4.proj"} <= set(scales.names), scales.refusals
    assert [point.name for point in scales.points if not point.entries] == ["aggregate"]
    shared = space_of(graph, "parallel_blocks.0.factoratt_crpe2.qkv")
    assert shared.prunable and "serial_blocks2.0.factoratt_crpe.qkv" in shared.names, shared.refusals
    sizes = assert_cut_computes_the_masked_network(model)
    assert "aggregate" not in sizes and sizes["head"]["in_features"] == 8


def test_a_fresh_coat_given_the_cut_sizes_computes_the_cut_network() -> None:
    """``apply_sizes`` (an export, a checkpoint written after a cut) sets the encoding's ``channel_splits`` with the
    cut's widths, so a fresh CoaT loads the cut weights and computes the cut network."""
    from pruneflow.compaction.cut import apply_sizes

    model, fresh = tiny_coat(parallel_depth=1), tiny_coat(parallel_depth=1)
    images = torch.randn(2, 3, 32, 32)
    _, compaction = masked_and_cut(model, images)
    apply_sizes(fresh, compaction.sizes).load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(images), compaction.model(images))


def test_an_encoding_with_a_dense_conv_refuses_the_stream_in_one_line() -> None:
    """A conv mixing the value rows of several heads would need them cut alike in every head it reads: refused."""
    model = tiny_coat()
    model.crpe1.conv_list[0] = nn.Conv2d(8, 8, 3, padding=1)
    stream = space_of(trace_channel_graph(model), "patch_embed1.proj")
    assert stream.refusals == [
        "factorised attention serial_blocks1.0.factoratt_crpe encodes relative positions with convs that are not "
        "depthwise over its value rows"
    ]
