"""timm's ``Attention`` (ViT, DeiT): its heads pruned whole (issue 28's heads, issue 31's timm rules).

The attention reshapes q, k, v by a head width of its own, so its q/k/v rows are a space of whole heads, not tied to
the stream it reads: a head's q, k and v rows all zero make its output exactly 0 (uniform softmax over zero values),
in the fused and the unfused path, so a mask at ``qkv``'s output is exact, and the cut takes whole heads out, its
``num_heads`` and ``attn_dim`` set to match.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pruneflow.compaction import CompactionError, compact
from pruneflow.compaction.cut import apply_sizes
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.pruning.budget import allowed_counts, pruned_count
from pruneflow.pruning.criteria import L1
from pruneflow.pruning.strategies import make_strategy

timm = pytest.importorskip("timm")
from timm.layers.attention import Attention  # noqa: E402  (after the skip: timm is an optional extra)

HEADS, HEAD_DIM, WIDTH = 4, 3, 8


class Tokens(nn.Module):
    """An embedding, timm's attention over the tokens, a mean over the tokens, a classifier."""

    def __init__(self, **attention: object) -> None:
        super().__init__()
        self.embed = nn.Linear(5, WIDTH)
        self.attn = Attention(WIDTH, num_heads=HEADS, attn_head_dim=HEAD_DIM, qkv_bias=True, **attention)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


def heads_space(model: nn.Module) -> ChannelSpace:
    return next(space for space in trace_channel_graph(model).spaces if space.name == "attn.qkv")


def masked_heads(model: nn.Module, heads: list[int]) -> dict[str, Tensor]:
    """``heads`` of ``model.attn`` masked with ``activation`` at ``qkv``'s output rows."""
    pruned = torch.zeros(3, HEADS, HEAD_DIM, dtype=torch.bool)
    pruned[:, heads] = True
    (layer,) = heads_space(model).producers
    masking = make_strategy("activation")
    masking.prepare(layer)
    masking.apply(layer, pruned.flatten())
    return {layer.name: pruned.flatten()}


def test_the_qkv_rows_are_a_space_of_whole_heads_read_by_proj_at_its_value_rows() -> None:
    space = heads_space(Tokens())
    assert space.prunable and space.whole_heads and space.tied_to is None
    assert (space.heads, space.width, space.head_unit, space.heads_of) == (HEADS, 3 * HEADS * HEAD_DIM, 9, "attn")
    (consumer,) = space.consumers
    value_rows = HEADS * HEAD_DIM
    assert consumer.name == "attn.proj" and consumer.at == (-1,) * (2 * value_rows) + tuple(range(value_rows))


@pytest.mark.parametrize("fused", [True, False])
def test_a_masked_head_is_the_cut_network_without_it_fused_or_not(fused: bool) -> None:
    torch.manual_seed(0)
    model = Tokens(qk_norm=True, norm_layer=nn.LayerNorm).eval()  # a q/k norm turns a zero q into β: v still 0
    model.attn.fused_attn = fused
    images = torch.randn(2, 6, 5)
    masks = masked_heads(model, [1, 3])
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks)
        attention = cut.model.attn
        assert (attention.num_heads, attention.attn_dim, attention.qkv.out_features) == (2, 6, 18)
        assert attention.proj.in_features == 6
        # measured from outside: the network rebuilt without heads 1 and 3 from the original weights
        assert torch.allclose(cut.model(images), masked, rtol=1e-5, atol=1e-6 * masked.abs().max().item())
    rebuilt = apply_sizes(Tokens(qk_norm=True, norm_layer=nn.LayerNorm), cut.sizes)
    rebuilt.load_state_dict(cut.model.state_dict())
    assert (rebuilt.attn.num_heads, rebuilt.attn.attn_dim) == (2, 6)


def test_the_criteria_select_whole_heads_of_it_without_mask_heads() -> None:
    space = heads_space(Tokens())
    pruned = L1().select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
    per_head = pruned.view(3, HEADS, HEAD_DIM)
    assert int(per_head.all(-1).all(0).sum()) == 2 and torch.equal(per_head.all(-1).all(0), per_head.any(-1).any(0))


def test_a_cut_inside_a_head_is_refused_naming_the_attention() -> None:
    model = Tokens()
    (layer,) = heads_space(model).producers
    pruned = torch.zeros(3 * HEADS * HEAD_DIM, dtype=torch.bool)
    pruned[0] = True
    with pytest.raises(CompactionError, match=r"attention attn is cut in whole heads only"):
        compact(model, {layer.name: pruned})


def test_the_budget_counts_it_in_whole_heads() -> None:
    space = heads_space(Tokens())
    assert allowed_counts(space, 0.9, 1).tolist() == [0, 9, 18, 27]
    assert pruned_count(space, 0.5) == 18


@pytest.mark.parametrize(
    ("settings", "reason"),
    [({"gated": True}, "gates its heads"), ({"scale_norm": True, "norm_layer": nn.LayerNorm}, "scale_norm=True")],
)
def test_variants_reading_the_heads_width_are_refused_in_one_line(settings: dict, reason: str) -> None:
    space = heads_space(Tokens(**settings))
    assert not space.prunable and reason in space.refusals[0] and "\n" not in space.refusals[0]


def test_heads_of_a_vit_are_pruned_whole_and_cut_with_num_heads_set() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    graph = trace_channel_graph(model)
    spaces = [space for space in graph.spaces if space.whole_heads]
    assert len(spaces) == len(model.blocks) and all(space.prunable for space in spaces)
    masking = make_strategy("activation")
    masks = {}
    for space in spaces:
        (layer,) = space.producers
        masks[layer.name] = L1().select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        masking.prepare(layer)
        masking.apply(layer, masks[layer.name])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks)
        assert [block.attn.num_heads for block in cut.model.blocks] == [1] * len(model.blocks)
        np.testing.assert_allclose(cut.model(images), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))


def test_a_latent_attention_pool_refuses_the_stream_it_reads_instead_of_a_cut_that_crashes() -> None:
    model = timm.create_model("test_vit3", num_classes=10).eval()  # global_pool="map": AttentionPoolLatent
    stream = next(space for space in trace_channel_graph(model).spaces if "patch_embed.proj" in space.names)
    assert not stream.prunable and "attention pool attn_pool reshapes its heads by its input's width" in stream.refusals


def test_a_flops_target_on_a_vit_is_met_by_its_cut_counting_heads_whole() -> None:
    from pruneflow.compaction.cost import count_flops
    from pruneflow.pruning.budget import TOLERANCE, allocate_budget
    from pruneflow.pruning.selection import select_spaces

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=32).eval()
    image = torch.randn(1, 3, 32, 32)
    allocation = allocate_budget(model, "flops:2.0", image, L1(), groups=True)
    masks = {}
    for space in select_spaces(trace_channel_graph(model).spaces, None, groups=True):
        pruned = L1().select(space, allocation.amounts[space.name], torch.zeros(space.width, dtype=torch.bool))
        if space.whole_heads:
            assert (
                allocation.pruned[space.name] % space.head_unit == 0
                and int(pruned.sum()) == allocation.pruned[space.name]
            )
        masks.update((layer.name, pruned) for layer in space.producers)
    measured = count_flops(model, image) / count_flops(compact(model, masks).model, image)
    assert abs(measured / 2.0 - 1) <= TOLERANCE, (measured, allocation.predicted_ratio)


def test_an_explicit_list_naming_part_of_a_head_is_refused_before_training() -> None:
    from pruneflow.errors import ConfigError
    from pruneflow.pruning.criteria import Explicit

    space = heads_space(Tokens())
    whole = [part * HEADS * HEAD_DIM + row for part in range(3) for row in range(HEAD_DIM)]  # head 0
    Explicit({"attn.qkv": whole}).check([space])
    with pytest.raises(ConfigError, match=r"^mask.channels\[attn.qkv\] must name whole heads of attention attn") as no:
        Explicit({"attn.qkv": whole[:-1]}).check([space])
    assert "\n" not in str(no.value)
