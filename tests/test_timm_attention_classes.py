"""timm's attention classes other than ``Attention`` (issue 31): BEiT's, EVA's, CaiT's talking heads and class
attention, tiny configs of each.

They reshape their heads' output by their input's width, so their q/k/v rows are tied to the stream they read
(pruned with it, as many positions per head as the stream keeps per head) and their head count stays: measured here
from outside, as the cut network's logits against the masked network's, on weights large enough that a masked
position changes them.
"""

from __future__ import annotations

import pytest
import torch
from test_channel_graph import check_masked_and_cut
from torch import Tensor, nn

from pruneflow.compaction import compact
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.cut import apply_sizes
from pruneflow.graph import ChannelGraph, trace_channel_graph
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.strategies import make_strategy
from pruneflow.pruning.telemetry import DriftTelemetry

timm = pytest.importorskip("timm")
from timm.models.cait import TalkingHeadAttn  # noqa: E402  (after the skip: timm is an optional extra)

HEADS, WIDTH = 4, 16
STRATEGIES = ["activation", "weight", "gradient", "hard", "parametrize", "control"]


def tiny(name: str, **settings: object) -> nn.Module:
    """A 2-block, 64-wide model of ``name`` at 64 px, every parameter drawn at a scale where each one shows."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, embed_dim=64, depth=2, num_heads=HEADS, img_size=64, **settings)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model.eval()


def mask_half(model: nn.Module) -> tuple[ChannelGraph, dict[str, Tensor]]:
    """Half of every prunable space of ``model`` (summed L1) masked with ``activation``, as the benchmark does."""
    graph = trace_channel_graph(model)
    strategy, masks = make_strategy("activation"), {}
    for space in graph.prunable:
        mask = L1().select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        for layer in space.producers:
            masks[layer.name] = mask
            strategy.apply(layer, mask)
    return graph, masks


def assert_same(cut: Tensor, masked: Tensor) -> None:
    scale = masked.abs().max().item()
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("fused", [True, False])
def test_beit_heads_follow_the_stream_and_its_cut_is_the_masked_network(fused: bool) -> None:
    model = tiny("beit_base_patch16_224")
    for block in model.blocks:
        block.attn.fused_attn = fused
    graph, masks = mask_half(model)
    heads = [space for space in graph.spaces if space.name.endswith("attn.qkv")]
    assert len(heads) == 2 and all(space.prunable and space.heads == HEADS for space in heads)
    assert all(space.tied_to is not None and space.tied_to.name == "patch_embed.proj" for space in heads)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks)
        assert_same(cut.model(images), masked)
    attention = cut.model.blocks[0].attn
    # the heads stay, each half as wide as the stream: the bias table keeps its per-head column, the fused path is off
    assert (attention.num_heads, attention.qkv.out_features, attention.proj.in_features) == (HEADS, 96, 32)
    assert attention.relative_position_bias_table.shape[1] == HEADS and not attention.fused_attn
    assert attention.q_bias.shape == attention.k_bias.shape == attention.v_bias.shape == (32,)
    assert count_flops(cut.model, images) < count_flops(model, images) / 2.5


def test_a_cut_beit_is_rebuilt_from_its_sizes() -> None:
    model = tiny("beit_base_patch16_224")
    _, masks = mask_half(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cut = compact(model, masks)
        rebuilt = apply_sizes(tiny("beit_base_patch16_224"), cut.sizes)
        rebuilt.load_state_dict(cut.model.state_dict())
        assert_same(rebuilt(images), cut.model(images))
    assert rebuilt.blocks[1].attn.k_bias.shape == (32,) and not rebuilt.blocks[1].attn.fused_attn


# BEiT's rows masked inside its attention under every strategy; CaiT's talking heads and class attention by
# ``activation`` (its other strategies take no path of their own)
CHECKED = [("beit_base_patch16_224", strategy) for strategy in STRATEGIES] + [("cait_xxs24_224", "activation")]


@pytest.mark.parametrize(("name", "strategy"), CHECKED)
def test_every_strategy_masks_beit_and_cait_and_the_activation_mask_leaks_nothing(name: str, strategy: str) -> None:
    """The shared check: for ``activation`` no consumer receives a pruned channel, no pruned row gets a gradient, and
    the cut is the masked network; every other strategy applies, trains a step and compacts."""
    settings = {"depth_token_only": 1} if name.startswith("cait") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, embed_dim=64, depth=2, num_heads=HEADS, img_size=64, **settings)
    graph = check_masked_and_cut(model, (3, 64, 64), strategy)
    assert any(space.heads > 1 and space.tied_to is not None for space in graph.prunable)


class TalkingTokens(nn.Module):
    """An embedding, CaiT's talking-heads attention over the tokens, a mean over the tokens, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, WIDTH)
        self.attn = TalkingHeadAttn(WIDTH, num_heads=HEADS, qkv_bias=True)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


def test_talking_heads_keep_their_heads_and_mixing_and_cut_exactly() -> None:
    torch.manual_seed(0)
    model = TalkingTokens().eval()
    graph, masks = mask_half(model)
    space = next(space for space in graph.spaces if space.name == "attn.qkv")
    assert space.prunable and space.heads == HEADS and space.tied_to.name == "embed"
    tokens = torch.randn(2, 6, 5)
    with torch.no_grad():
        masked = model(tokens)
        cut = compact(model, masks)
        assert_same(cut.model(tokens), masked)
    attention = cut.model.attn
    assert (attention.num_heads, attention.qkv.out_features, attention.proj.in_features) == (HEADS, 24, 8)
    assert attention.proj_l.in_features == attention.proj_w.in_features == HEADS  # mixing over the heads, whole
    assert count_flops(cut.model, tokens) < count_flops(model, tokens)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eva_with_rope_is_cut_by_whole_frequencies_with_its_stream(strategy: str) -> None:
    """DINOv3's rope rotates pairs of positions inside every head alike: its q/k positions go by whole frequencies of
    its table, the same in every head (``timm_rope``), the stream losing as many per head."""
    graph = check_masked_and_cut(tiny("vit_tiny_patch16_dinov3_qkvb"), (3, 64, 64), strategy)
    heads = next(space for space in graph.spaces if space.name == "blocks.0.attn.qkv")
    assert heads.rope is not None and heads.heads == HEADS and heads.tied_to.name == "patch_embed.proj"
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]


@pytest.mark.parametrize("fused", [True, False])
def test_cait_with_its_class_attention_is_cut_exactly_its_stream_one_space(fused: bool) -> None:
    model = tiny("cait_xxs24_224", depth_token_only=2)
    for block in model.blocks_token_only:
        block.attn.fused_attn = fused
    graph, masks = mask_half(model)
    class_heads = next(space for space in graph.spaces if space.name == "blocks_token_only.0.attn.q")
    # q, k and v of the class attention: one position of a head from all three, tied to the one stream
    assert class_heads.prunable and (class_heads.heads, class_heads.parts, class_heads.width) == (HEADS, 1, 64)
    assert class_heads.names == [f"blocks_token_only.0.attn.{part}" for part in "qkv"]
    assert class_heads.tied_to.name == "patch_embed.proj" and class_heads.tied_to.prunable
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks)
        assert_same(cut.model(images), masked)
    attention = cut.model.blocks_token_only[1].attn
    assert (attention.num_heads, attention.q.out_features, attention.proj.in_features) == (HEADS, 32, 32)
    assert not attention.fused_attn and cut.model.cls_token.shape == (1, 1, 32)
    assert count_flops(cut.model, images) < count_flops(model, images) / 2.5


@pytest.mark.parametrize(("strategy", "leaks"), [("weight", True), ("activation", False)])
def test_telemetry_counts_beits_query_and_value_biases_in_the_leak_of_its_pruned_rows(
    strategy: str, leaks: bool
) -> None:
    model = tiny("beit_base_patch16_224").train()
    (layer,) = next(space for space in trace_channel_graph(model).spaces if space.name == "blocks.0.attn.qkv").producers
    pruned = torch.zeros(3, HEADS, WIDTH, dtype=torch.bool)
    pruned[..., :8] = True  # half of every head's positions, the same from q, k and v
    masking = make_strategy(strategy)
    masking.prepare(layer)
    telemetry = DriftTelemetry([layer], masking, dict(model.named_modules()))
    masking.apply(layer, pruned.flatten())
    telemetry.on_pruned(layer, pruned.flatten())
    telemetry.arm(True)
    model(torch.randn(2, 3, 64, 64))
    leak = telemetry.measure()["leak/activation_abs_mean"]
    assert leak > 0 if leaks else leak == 0  # weight zeroes qkv's rows; the biases q_bias, v_bias still write them


class TwoStreams(nn.Module):
    """One class token concatenated with two streams that never join: a cut of either would cut it for both."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.embed_a, self.embed_b = nn.Conv2d(3, WIDTH, 4, 4), nn.Conv2d(3, WIDTH, 4, 4)  # patch embeddings
        self.head_a, self.head_b = nn.Linear(WIDTH, 10), nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        a = torch.cat([cls_token, self.embed_a(x).flatten(2).transpose(1, 2)], dim=1)
        b = torch.cat([cls_token, self.embed_b(x).flatten(2).transpose(1, 2)], dim=1)
        return self.head_a(a[:, 0]) + self.head_b(b[:, 0])


def test_a_class_token_joined_to_two_streams_that_stay_apart_refuses_both() -> None:
    graph = trace_channel_graph(TwoStreams())
    streams = [space for space in graph.spaces if space.name in ("embed_a", "embed_b")]
    assert len(streams) == 2
    for space in streams:
        assert space.refusals == ["parameter cls_token writes the channels of 2 spaces that stay apart"]
