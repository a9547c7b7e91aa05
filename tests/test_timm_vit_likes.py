"""timm's ViT-likes on tiny configurations (small widths, depths and images: seconds): their token streams, MLP
hidden widths and heads are prunable where a cut is exact, and half of every prunable space masked (L1,
``activation``) and cut gives the masked network's function."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut
from torch import nn

from pruneflow.compaction import Compaction
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import ChannelGraph, ChannelSpace, trace_channel_graph

timm = pytest.importorskip("timm")
import pruneflow.graph.handlers.timm_layers  # noqa: E402, F401  (timm is imported: its rules register at trace)


def space_of(graph: ChannelGraph, layer: str) -> ChannelSpace:
    return next(space for space in graph.spaces if layer in space.names)


def assert_cut_equals_masked(model: nn.Module, size: int) -> Compaction:
    """``model`` half masked and cut computes the masked network, and is smaller; the cut, to look into."""
    torch.manual_seed(0)
    model = randomize_norms(model).eval()  # β ≠ 0: a leaking mask would show
    images = torch.randn(2, 3, size, size)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()
    return compaction


def tiny_pit() -> nn.Module:
    from timm.models.pit import PoolingVisionTransformer

    torch.manual_seed(0)
    return PoolingVisionTransformer(img_size=32, patch_size=4, stride=2, base_dims=(8, 8), depth=(1, 1),
                                    heads=(2, 4), mlp_ratio=2, num_classes=10)  # fmt: skip


def tiny_visformer() -> nn.Module:
    from timm.models.visformer import Visformer

    torch.manual_seed(0)
    return Visformer(img_size=32, init_channels=8, embed_dim=24, depth=(1, 1, 1), num_heads=3, mlp_ratio=2.0,
                     group=8, attn_stage="011", spatial_conv="100", norm_layer=nn.BatchNorm2d,
                     embed_norm=nn.BatchNorm2d, num_classes=10)  # fmt: skip


def test_pit_stream_takes_its_map_position_embedding_and_class_token_as_sources_and_cuts_exactly() -> None:
    """PiT adds a (1, C, H, W) position embedding to its patch embedding's map, concatenates a class token whose
    shape it reads, and reshapes its tokens back to a map (B, C, H, W) between stages: all follow the stream. The
    next stage's pooling, a depthwise conv writing 2 channels per channel (``handlers.multipliers``), and its class
    token's Linear write the next stage's stream at 2 entries per channel of this one: one space."""
    graph = trace_channel_graph(tiny_pit())
    stream = space_of(graph, "patch_embed.conv")
    assert stream.prunable, stream.refusals
    assert {"transformers.0.blocks.0.attn.proj", "transformers.0.blocks.0.mlp.fc2"} <= set(stream.names)
    assert sorted((source.name, source.dim) for source in stream.sources) == [("cls_token", 2), ("pos_embed", 1)]
    # the next stage's stream: its class token's Linear and its pooling conv, concatenated along the tokens
    pooling = {point.name: point.per_channel for point in stream.points if ".pool." in point.name}
    assert pooling == {"transformers.1.pool.conv": 2, "transformers.1.pool.fc": 2}
    assert_cut_equals_masked(tiny_pit(), 32)


def test_visformer_attention_on_a_map_is_cut_in_whole_heads_and_cuts_exactly() -> None:
    """Visformer's attention works on a map with 1 × 1 convs; each stage adds a (1, C, H, W) position embedding to
    its map, a source along dim 1 (the cut below takes half of each stage's channels from it)."""
    graph = trace_channel_graph(tiny_visformer())
    heads = space_of(graph, "stage2.0.attn.qkv")
    assert heads.prunable and heads.whole_heads and heads.heads == 3, heads.refusals
    for stage in (1, 2, 3):
        sources = space_of(graph, f"patch_embed{stage}.proj").sources
        assert [(source.name, source.dim) for source in sources] == [(f"pos_embed{stage}", 1)]
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert_cut_equals_masked(tiny_visformer(), 32)


def tiny_vit_relpos(**options: object) -> nn.Module:
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    torch.manual_seed(0)
    return VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
                                   num_classes=10, **options)  # fmt: skip


@pytest.mark.parametrize("options", [{}, {"rel_pos_type": "bias", "class_token": True, "global_pool": "token"}])
def test_vit_relpos_attention_ties_its_heads_to_the_stream_and_cuts_exactly(options: dict[str, object]) -> None:
    """ViT-RelPos reshapes q, k, v by its ``head_dim`` and its heads' output by its input's width: its heads follow
    the stream (the cut sets ``head_dim``), its per-head relative position bias stays whole."""
    graph = trace_channel_graph(tiny_vit_relpos(**options))
    heads = space_of(graph, "blocks.0.attn.qkv")
    assert heads.prunable and heads.tied_to is space_of(graph, "patch_embed.proj"), heads.refusals
    assert heads.head_width_of == "blocks.0.attn"
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert_cut_equals_masked(tiny_vit_relpos(**options), 32)


def tiny_crossvit() -> nn.Module:
    from timm.models.crossvit import CrossVit

    torch.manual_seed(0)
    return CrossVit(img_size=32, patch_size=(8, 16), embed_dim=(16, 24), depth=((1, 1, 1),), num_heads=(2, 2),
                    mlp_ratio=(2.0, 2.0, 2.0), num_classes=10)  # fmt: skip


def test_crossvit_branches_are_streams_and_their_cross_attention_is_a_class_attention() -> None:
    """CrossViT takes its class tokens by ``x[:, 0:1, ...]``, projects each to the other branch, concatenates it
    with that branch's tokens and lets it attend to them (``CrossAttention``'s ``wq``, ``wk``, ``wv``): each branch
    one stream, its cross attention's q/k/v rows tied to it, as CaiT's class attention."""
    graph = trace_channel_graph(tiny_crossvit())
    small, large = space_of(graph, "patch_embed.0.proj"), space_of(graph, "patch_embed.1.proj")
    assert small.prunable and large.prunable, (small.refusals, large.refusals)
    assert {"blocks.0.projs.1.2", "blocks.0.revert_projs.0.2"} <= set(small.names)
    cross = space_of(graph, "blocks.0.fusion.0.0.attn.wq")
    assert cross.prunable and cross.tied_to is large and cross.parts == 1
    assert_cut_equals_masked(tiny_crossvit(), 32)


def tiny_naflexvit(**options: object) -> nn.Module:
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    torch.manual_seed(0)
    settings = {"pos_embed": "factorized", "reg_tokens": 2, "global_pool": "avg", **options}
    config = NaFlexVitCfg(patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, pos_embed_grid_size=(4, 4),
                          **settings)  # fmt: skip
    return NaFlexVit(config, num_classes=10, img_size=32)


@pytest.mark.parametrize("options", [{}, {"pos_embed": "learned", "class_token": True, "global_pool": "token"}])
def test_naflexvit_patch_embedding_writes_the_stream_its_tables_and_tokens_are_sources(options: dict) -> None:
    """NaFlexViT's ``NaFlexEmbeds`` (kept whole by timm) writes the stream with its position tables and prefix tokens
    as sources; ``global_pool_naflex`` pools each channel over the tokens."""
    graph = trace_channel_graph(tiny_naflexvit(**options))
    stream = space_of(graph, "embeds.proj")
    assert stream.prunable and "blocks.1.mlp.fc2" in stream.names, stream.refusals
    tables = {"embeds.pos_embed", "embeds.cls_token"} if options else {"embeds.pos_embed_y", "embeds.pos_embed_x"}
    assert {source.name for source in stream.sources} == tables | {"embeds.reg_token"}
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]
    assert_cut_equals_masked(tiny_naflexvit(**options), 32)


def test_an_attention_with_rotary_embeddings_is_cut_in_whole_heads() -> None:
    """timm's ``AttentionRope`` (Qwen3-ViT) reshapes by its own head width, as timm's ``Attention``: a head whose
    value rows are 0 gives 0 whatever the rotation did to its q and k. Qwen3-ViT's position embedding reaches the
    stream through ``resample_pos_embed_grid`` and ``.to(dtype)``: a source of it."""
    torch.manual_seed(0)
    model = timm.create_model("qwen3_vit_88m", num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                              img_size=32)  # fmt: skip
    graph = trace_channel_graph(model)
    heads = space_of(graph, "encoder.blocks.0.attn.qkv")
    assert heads.prunable and heads.whole_heads and heads.heads == 2, heads.refusals
    assert [source.name for source in space_of(graph, "encoder.patch_embed.proj").sources] == ["encoder.pos_embed"]
    assert_cut_equals_masked(model, 32)
