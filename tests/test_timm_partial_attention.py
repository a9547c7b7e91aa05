"""The attentions of timm's models that attend over a part of the stream's channels, on tiny configurations (small
widths, depths and images: seconds): EfficientViT-MSRA's cascaded group attention (one equal chunk per head) and
SHViT's single-head attention (the first ``pdim`` channels). The stream each reads is cut, the masked network and
the cut one compute the same function, and the cut attention is smaller."""

from __future__ import annotations

import pytest
import torch
from test_channel_graph import check_masked_and_cut
from test_timm_vit_likes import assert_cut_equals_masked, space_of
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def tiny_efficientvit_msra(**options: object) -> nn.Module:
    """Windows of 2 on maps of 4 (the partitioned path) and of 2 (the whole one), 2 heads of 8 and 16 channels."""
    from timm.models.efficientvit_msra import EfficientVitMsra

    torch.manual_seed(0)
    settings = dict(img_size=64, embed_dim=(16, 32, 48), key_dim=(4, 4, 4), depth=(1, 1, 1), num_heads=(2, 2, 3),
                    window_size=(2, 2, 2), kernels=(3, 3, 3), num_classes=10) | options  # fmt: skip
    return EfficientVitMsra(**settings)


def tiny_shvit(**options: object) -> nn.Module:
    from timm.models.shvit import SHViT

    torch.manual_seed(0)
    settings = dict(embed_dim=(16, 24, 32), partial_dim=(4, 8, 12), qk_dim=(4, 4, 4), depth=(1, 1, 2),
                    types=("i", "s", "s"), num_classes=10) | options  # fmt: skip
    return SHViT(**settings)


def cut_of(model: nn.Module, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    return masked_and_cut(model, torch.randn(2, 3, size, size))[1].model


@pytest.mark.parametrize("tiny", [tiny_efficientvit_msra, tiny_shvit])
def test_a_fresh_network_given_the_cut_sizes_computes_the_cut_one(tiny: object) -> None:
    """The cut's sizes hold every attribute it set on an attention, its split's sizes (``val_dim``, ``pdim``) beside
    the widths it reshapes by (``key_dim``): a fresh network given them (an export, a checkpoint written after the
    cut) loads the cut weights and computes the cut network."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    compaction = masked_and_cut(randomize_norms(tiny()).eval(), images)[1]
    fresh = apply_sizes(tiny(), compaction.sizes)
    fresh.load_state_dict(compaction.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), compaction.model(images))


def test_cascaded_group_attention_cuts_its_stream_in_equal_chunks_and_its_keys() -> None:
    """EfficientViT-MSRA's ``LocalWindowAttention``: its input chunked per head, each head's values added into the
    next head's chunk and read by ``proj`` beside the others: the stream is cut at the same positions in each chunk,
    each head's value rows with the chunk after its own; the heads' q and k rows (``key_dim``, q through a depthwise
    conv) one space. Both prunable, and the cut computes the masked network."""
    graph = trace_channel_graph(tiny_efficientvit_msra())
    attention = "stages.1.blocks.0.mixer.m.attn"
    stream = space_of(graph, "stages.1.blocks.0.dw0.m.conv")
    assert stream.prunable and stream.groups == 2, stream.refusals
    assert {f"{attention}.qkvs.0.conv", f"{attention}.qkvs.1.bn"} <= {point.name for point in stream.points}
    keys = space_of(graph, f"{attention}.dws.0.conv")
    assert keys.prunable and f"{attention}.dws.1.conv" in keys.names and keys.held_by == [(attention, "key_dim")]
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.linear"], [
        (space.name, space.refusals) for space in graph.spaces if not space.prunable]  # fmt: skip
    assert_cut_equals_masked(tiny_efficientvit_msra(), 64)


def test_cascaded_group_attention_cut_is_smaller_per_head() -> None:
    """The cut attention keeps half of each chunk (``val_dim``) and of the keys (``key_dim``) in every head."""
    cut = cut_of(tiny_efficientvit_msra(), 64).stages[2].blocks[0].mixer.m.attn
    assert (cut.val_dim, cut.key_dim) == (8, 2)
    assert [qkv.conv.weight.shape[:2] for qkv in cut.qkvs] == [torch.Size([12, 8])] * 3
    assert cut.proj[1].conv.weight.shape[:2] == torch.Size([24, 24])


@pytest.mark.parametrize("tiny", [tiny_efficientvit_msra, tiny_shvit])
def test_masked_channels_reach_every_reader_as_zero_with_zero_gradient(tiny: object) -> None:
    """Under ``activation`` masks each reader of the stream (every head's ``qkv``, ``proj`` through its value
    columns) receives exactly 0 on the pruned channels, the pruned rows get no gradient, and the cut computes the
    masked network, in training mode as the callback traces it."""
    check_masked_and_cut(tiny(), (3, 64, 64), "activation")


def test_cascaded_group_attention_with_a_reviving_activation_is_refused_in_one_line() -> None:
    """A ``proj`` activation that turns a pruned value's 0 into another value refuses the stream in one line."""
    model = tiny_efficientvit_msra()
    model.stages[1].blocks[0].mixer.m.attn.proj[0] = nn.Sigmoid()
    refusals = space_of(trace_channel_graph(model), "stages.1.blocks.0.dw0.m.conv").refusals
    assert refusals == ["attention stages.1.blocks.0.mixer.m (LocalWindowAttention) activates its heads' output with "
                        "Sigmoid, which turns a 0 into another value"], refusals  # fmt: skip


def test_single_head_attention_cuts_its_part_of_the_stream_and_the_rest() -> None:
    """SHViT's ``SHSA``: the stream split at ``pdim``, its first part normalised and read by ``qkv``, whose value rows
    go with it to ``proj`` beside the rest: one stream, its split recorded so each part keeps its share; prunable,
    and the cut computes the masked network."""
    graph = trace_channel_graph(tiny_shvit())
    attention = "stages.2.blocks.0.mixer.m"
    stream = space_of(graph, "stages.2.blocks.0.conv.m.c")
    assert stream.prunable, stream.refusals
    splits = [(split.owner, split.sizes) for split in stream.splits if split.owner == attention]
    assert splits == [(attention, (12, 20))]
    assert {f"{attention}.pre_norm", f"{attention}.qkv.c", f"{attention}.qkv.bn"} <= {p.name for p in stream.points}
    assert [space.name for space in graph.spaces if not space.prunable] == ["head.l"], [
        (space.name, space.refusals) for space in graph.spaces if not space.prunable]  # fmt: skip
    assert_cut_equals_masked(tiny_shvit(), 64)


def test_single_head_attention_cut_sets_its_split() -> None:
    """The cut attention splits its smaller stream at its smaller ``pdim`` and reshapes its values by it."""
    cut = cut_of(tiny_shvit(), 64).stages[2].blocks[0].mixer.m
    assert (cut.pdim, cut.dim) == (6, 16)
    assert cut.qkv.c.weight.shape[:2] == torch.Size([2 * cut.qk_dim + 6, 6])
    assert cut.proj[1].c.weight.shape[:2] == torch.Size([16, 16])


def test_single_head_attention_with_a_norm_across_channels_in_groups_is_refused_in_one_line() -> None:
    """A ``pre_norm`` the graph cannot cut on a part of the stream (a GroupNorm of 2 groups) refuses the stream in
    one line naming it."""
    model = tiny_shvit(norm_layer=lambda channels, **kwargs: nn.GroupNorm(2, channels, **kwargs))
    refusals = space_of(trace_channel_graph(model), "stages.1.blocks.0.conv.m.c").refusals
    assert refusals[0] == ("single-head attention stages.1.blocks.0.mixer.m (SHSA) normalises its part of the stream "
                           "with GroupNorm pre_norm, which is not a norm over each sample's channels"), refusals
