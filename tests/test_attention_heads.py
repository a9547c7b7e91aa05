"""Whole attention heads as pruning units (``mask.heads=true``, issue 28): a head is scored over its q, k and v
rows, all its rows are pruned together, and the masked Swin computes the network without those heads."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import compose_train
from test_window_attention import tiny_swin

from pruneflow.compaction import CompactionError, compact
from pruneflow.errors import ConfigError
from pruneflow.experiment.run import build_callbacks, validate_config
from pruneflow.graph import trace_channel_graph
from pruneflow.pruning.callback import ChannelPruning
from pruneflow.pruning.criteria import L1, select_whole_heads
from pruneflow.pruning.selection import select_spaces
from pruneflow.pruning.strategies import make_strategy


def test_a_head_is_scored_over_its_q_k_and_v_rows_and_pruned_whole() -> None:
    # Two heads of width 2. Head 0 has the lowest q and k rows but large values; head 1 is lower over all three.
    q = torch.tensor([0.1, 0.1, 1.0, 1.0])
    k = torch.tensor([0.1, 0.1, 1.0, 1.0])
    v = torch.tensor([9.0, 9.0, 1.0, 1.0])
    pruned = select_whole_heads(torch.cat([q, k, v]), 2, 1, torch.zeros(12, dtype=torch.bool))
    assert pruned.view(3, 2, 2)[:, 1].all() and not pruned.view(3, 2, 2)[:, 0].any()


def test_heads_pruned_already_stay_pruned() -> None:
    already = torch.zeros(3, 2, 2, dtype=torch.bool)
    already[:, 1] = True
    scores = torch.tensor([0.1, 0.1, 5.0, 5.0] * 3)  # head 0 is the weaker one now
    assert torch.equal(select_whole_heads(scores, 2, 1, already.flatten()), already.flatten())


def test_the_masked_swin_without_whole_heads_computes_the_network_without_them() -> None:
    torch.manual_seed(0)
    model = tiny_swin().eval()
    graph = trace_channel_graph(model)
    spaces = [space for space in select_spaces(graph.spaces, None, heads=True) if space.heads > 1]
    assert len(spaces) == 4  # one per block, each on its own: the stream they read stays whole
    criterion, masking = L1(), make_strategy("activation")
    criterion.whole_heads = True
    reference = copy.deepcopy(model)
    masks = {}
    for space in spaces:
        pruned = criterion.select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        per_head = pruned.view(3, space.heads, -1)
        whole = per_head.all(-1).all(0)
        assert int(whole.sum()) == space.heads // 2 and torch.equal(per_head.any(-1).any(0), whole)  # whole heads
        for layer in space.producers:
            masks[layer.name] = pruned
            masking.prepare(layer)
            masking.apply(layer, pruned)
        # The reference: the attention's output without those heads, whose values reach proj's columns.
        attention = reference.get_submodule(space.producers[0].name.rpartition(".")[0])
        dropped = per_head[2].flatten()
        with torch.no_grad():
            attention.proj.weight[:, dropped] = 0
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        masked, expected = model(images), reference(images)
    assert (masked - expected).abs().max() <= 1e-5 * expected.abs().max()
    with pytest.raises(CompactionError, match=r"whole heads are pruned \(mask.heads=true\)"):
        compact(model, masks)


@pytest.mark.parametrize(
    "settings", [{"target": "flops:2.0"}, {"amount": 0.5, "cut_at_epoch": 1}], ids=["target", "cut"]
)
def test_heads_of_swin_with_a_target_or_a_cut_are_refused_in_one_line_before_training(settings: dict) -> None:
    pruning = ChannelPruning(**{"heads": True, **settings})
    with pytest.raises(ConfigError, match=r"^mask.heads=true cannot cut the whole heads of .*timm's Attention") as no:
        pruning.plan.choose_spaces(tiny_swin())
    assert "\n" not in str(no.value)


def test_heads_not_a_bool_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^mask.heads must be true or false, got 'yes'"):
        ChannelPruning(heads="yes", amount=0.5)


def test_compact_with_whole_heads_of_swin_is_refused_before_training() -> None:
    cfg = compose_train("mask=activation", "mask.heads=true", "compact=true")
    validate_config(cfg)  # the config alone is fine: timm's attentions cut whole heads
    (pruning,) = [callback for callback in build_callbacks(cfg) if isinstance(callback, ChannelPruning)]
    with pytest.raises(ConfigError, match=r"^mask.heads=true cannot cut the whole heads of features.1.0.attn.qkv"):
        pruning.plan.choose_spaces(tiny_swin())
