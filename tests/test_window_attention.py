"""Swin's attention (issue 23): the embedding width as one coupled space, each head's q, k, v rows tied to it.

torchvision's ``shifted_window_attention`` takes its head width, and its scale 1/√(head width), from its input's
width: a narrower residual stream needs narrower heads. The graph keeps the attention whole (a leaf): its ``qkv``
reads the stream and writes a space of q, k, v rows per head, pruned with the stream (as many positions per
head as the stream keeps per head, the same from q and k); the activation mask computes the attention again
without the pruned rows; the cut scales the kept query rows by √(d'/d), so the smaller heads compute the
masked network's logits.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_channel_graph import check_masked_and_cut, space_of
from torchvision.models.swin_transformer import SwinTransformer

from pruneflow.compaction import Compaction, CompactionError, compact, effective_copy
from pruneflow.compaction.cost import count_flops
from pruneflow.compaction.verify import randomize_norms
from pruneflow.errors import ConfigError
from pruneflow.graph import trace_channel_graph
from pruneflow.pruning.criteria import L1, Explicit, select_per_head
from pruneflow.pruning.selection import select_spaces
from pruneflow.pruning.strategies import make_strategy
from pruneflow.pruning.telemetry import DriftTelemetry

STRATEGIES = ["activation", "weight", "gradient", "hard", "parametrize", "control"]


def tiny_swin() -> SwinTransformer:
    """Two stages of torchvision's Swin: 2 and 4 heads of width 8, shifted windows, a patch merging between."""
    return SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    )


def half_by_l1(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    graph = trace_channel_graph(model)
    masks = {}
    for space in select_spaces(graph.spaces, None, groups=True):
        pruned = L1().select(space, 0.5, torch.zeros(space.width, dtype=torch.bool))
        masks.update((layer.name, pruned) for layer in space.producers)
    return masks



def masked_half(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Half of every space (a stream with its tied q, k, v rows) by L1, masked with ``activation``."""
    masks, masking = half_by_l1(model), make_strategy("activation")
    for layer in trace_channel_graph(model).layers:
        if layer.name in masks:
            masking.prepare(layer)
            masking.apply(layer, masks[layer.name])
    return masks

def masked_and_cut(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Compaction]:
    """``model`` with half of every space (tied heads included) masked by L1 with ``activation``: its logits on
    ``images``, and its cut."""
    masks, masking = half_by_l1(model), make_strategy("activation")
    layers = {layer.name: layer for layer in trace_channel_graph(model).layers}
    for name, mask in masks.items():
        masking.prepare(layers[name])
        masking.apply(layers[name], mask)
    with torch.no_grad():
        return model(images), compact(model, masks)


def test_the_embedding_width_is_one_coupled_space_with_each_attentions_heads_tied_to_it() -> None:
    graph = trace_channel_graph(tiny_swin())
    stream = space_of(graph, "features.0.0")  # the patch embedding, every attention's proj, every MLP's output
    assert stream.prunable and stream.coupled and stream.multiple == 2
    assert {"features.1.0.attn.proj", "features.1.1.mlp.3"} <= set(stream.names)
    heads = space_of(graph, "features.1.0.attn.qkv")
    assert heads.prunable and heads.heads == 2 and heads.width == 48 and heads.tied_to is stream
    assert [(c.name, c.at[32:]) for c in heads.consumers] == [("features.1.0.attn.proj", tuple(range(16)))]
    # the patch merging's norm reads the stream 4 times over, side by side
    merging = [(point.name, point.offset) for point in stream.points if point.name == "features.2.norm"]
    assert merging == [("features.2.norm", offset) for offset in (0, 16, 32, 48)]
    assert [space.name for space in graph.spaces if not space.prunable] == ["head"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_swin_masks_exactly_and_cuts_to_the_masked_function(strategy: str) -> None:
    graph = check_masked_and_cut(tiny_swin(), (3, 32, 32), strategy)
    assert space_of(graph, "features.3.1.attn.qkv").heads == 4


def test_each_head_keeps_the_same_query_and_key_positions_and_as_many_values() -> None:
    # q, k, v of two heads of width 2: q = (5, 1 | 4, 2), k = (1, 2 | 0, 0), v = (3, 1 | 2, 9)
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 1.0, 2.0, 0.0, 0.0, 3.0, 1.0, 2.0, 9.0])
    pruned = select_per_head(scores, heads=2, per_head=1, already_pruned=torch.zeros(12, dtype=torch.bool))
    q, k, v = pruned.view(3, 2, 2)
    assert torch.equal(q, k) and q.sum(1).tolist() == [1, 1] and v.sum(1).tolist() == [1, 1]
    # head 0: q+k = (6, 3) → position 1; head 1: (4, 2) → position 1; values: (3, 1) → 1, (2, 9) → 0
    assert pruned.nonzero().flatten().tolist() == [1, 3, 5, 7, 9, 10]


def test_heads_are_pruned_with_the_stream_they_read_or_not_at_all() -> None:
    graph = trace_channel_graph(tiny_swin())
    without_groups = {space.name for space in select_spaces(graph.spaces, None, groups=False)}
    assert "features.0.0" not in without_groups and "features.1.0.attn.qkv" not in without_groups
    chosen = {space.name for space in select_spaces(graph.spaces, ["features.1.0.attn.qkv"], groups=True)}
    assert {"features.0.0", "features.1.0.attn.qkv", "features.1.1.attn.qkv"} <= chosen
    with pytest.raises(ConfigError, match="cannot be pruned"):
        select_spaces(graph.spaces, ["features.1.0.attn.qkv"], groups=False)


def test_a_cut_of_heads_that_does_not_follow_the_stream_is_refused_naming_why() -> None:
    model = tiny_swin().eval()
    masks = half_by_l1(model)
    masks.pop("features.0.0")  # the stream keeps its width, its heads would shrink
    masks = {name: mask for name, mask in masks.items() if not name.startswith("features.3")}
    masks = {name: mask for name, mask in masks.items() if "reduction" not in name}
    with pytest.raises(CompactionError, match=r"features\.1\.0\.attn\.qkv.*keeps 16 channels for 2 heads"):
        compact(model, {name: mask for name, mask in masks.items() if name.endswith(("qkv", "mlp.0"))})


def test_half_of_swin_by_l1_cuts_at_least_3x_the_flops_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_norms(tiny_swin()).eval()
    images = torch.randn(2, 3, 32, 32)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        assert (compaction.model(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
    qkv = compaction.model.features[1][0].attn.qkv
    assert (qkv.in_features, qkv.out_features) == (8, 24)  # 2 heads of width 4
    ratio = count_flops(effective_copy(model), images[:1]) / count_flops(compaction.model, images[:1])
    assert ratio >= 3.0, ratio


@pytest.mark.parametrize(("strategy", "leaks"), [("weight", True), ("activation", False)])
def test_telemetry_measures_the_leak_of_pruned_query_key_and_value_rows(strategy: str, leaks: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(tiny_swin()).train()
    graph = trace_channel_graph(model)
    (layer,) = space_of(graph, "features.1.0.attn.qkv").producers
    mask = select_per_head(torch.rand(48), 2, 4, torch.zeros(48, dtype=torch.bool))
    masking = make_strategy(strategy)
    masking.prepare(layer)
    telemetry = DriftTelemetry([layer], masking, dict(model.named_modules()))
    masking.apply(layer, mask)
    telemetry.on_pruned(layer, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()  # zeroed rows get a gradient unless the attention is computed without them
    telemetry.arm(True)
    model(torch.randn(4, 3, 32, 32))
    leak = telemetry.measure()["leak/activation_abs_mean"]
    assert leak > 0 if leaks else leak == 0


@pytest.mark.slow
def test_swin_t_at_224_cuts_at_least_3x_the_flops_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.swin_t(num_classes=10)).eval()
    images = torch.randn(2, 3, 224, 224)
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        assert (compaction.model(images) - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert count_flops(effective_copy(model), images[:1]) / count_flops(compaction.model, images[:1]) >= 3.0


def test_the_masked_network_trains_on_as_the_cut_one_its_heads_at_their_cut_width() -> None:
    """The masked attention divides its logits by the cut heads' √d' (its kept query rows times √(d/d')), so the
    masked and the cut network are one function of the kept weights: the same steps keep them equal."""
    torch.manual_seed(0)
    model = randomize_norms(tiny_swin()).eval()  # eval: no dropout or stochastic depth, gradients all the same
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cut = masked_and_cut(model, images)[1].model
    optimizers = [torch.optim.SGD(network.parameters(), lr=0.5) for network in (model, cut)]
    for _ in range(3):
        for network, optimizer in zip((model, cut), optimizers, strict=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(images), labels).backward()
            optimizer.step()
    with torch.no_grad():
        masked, after = model(images), cut(images)
    assert (masked - after).abs().max() <= 1e-4 * masked.abs().max(), (masked - after).abs().max()


def test_an_explicit_list_for_a_stream_swin_heads_follow_is_refused_unless_they_follow_too() -> None:
    # Issue 31, review defect 5: a list naming the stream only passed the criterion's check, then the cut raised.
    graph = trace_channel_graph(tiny_swin())
    stream_only = Explicit({"features.0.0": [0, 1]})
    spaces = select_spaces(graph.spaces, stream_only.patterns, groups=True)
    with pytest.raises(ConfigError, match=r"features\.1\.0\.attn\.qkv.*7 each \(its input keeps 14 channels"):
        stream_only.check(spaces)
    # q, k and v at position 0 of both heads (head width 8): each head keeps 7, as the stream keeps 14 for 2
    rows = [0, 8, 16, 24, 32, 40]
    named = {"features.0.0": [0, 1], "features.1.0.attn.qkv": rows, "features.1.1.attn.qkv": rows}
    Explicit(named).check(select_spaces(graph.spaces, list(named), groups=True))
    uneven = {**named, "features.1.1.attn.qkv": [0, 1, 16, 17, 32, 33]}  # head 0 loses 2, head 1 none
    with pytest.raises(ConfigError, match=r"features\.1\.1\.attn\.qkv"):
        Explicit(uneven).check(select_spaces(graph.spaces, list(uneven), groups=True))


def test_an_explicit_list_that_the_heads_follow_masks_and_cuts_to_the_masked_function() -> None:
    model, images = tiny_swin().eval(), torch.randn(2, 3, 32, 32)
    randomize_norms(model)
    rows = [0, 8, 16, 24, 32, 40]
    criterion = Explicit({"features.0.0": [0, 1], "features.1.0.attn.qkv": rows, "features.1.1.attn.qkv": rows})
    graph = trace_channel_graph(model)
    spaces = select_spaces(graph.spaces, criterion.patterns, groups=True)
    criterion.check(spaces)
    masking, masks = make_strategy("activation"), {}
    for space in spaces:
        pruned = criterion.select(space, 0.0, torch.zeros(space.width, dtype=torch.bool))
        for layer in space.producers:
            masking.prepare(layer)
            masking.apply(layer, pruned)
            masks[layer.name] = pruned
    with torch.no_grad():
        masked = model(images)
        cut = compact(model, masks).model(images)
    torch.testing.assert_close(cut, masked, rtol=1e-4, atol=1e-4 * masked.abs().max().item())
