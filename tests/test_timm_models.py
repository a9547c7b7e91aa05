"""timm's tiny ``test_*`` models: traced without an exception, half of every prunable space masked (L1,
``activation``), cut, and the cut network equal to the masked one; the CNNs built from timm's norm-act modules
(``BatchNormAct2d``) are pruned, not refused."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut

from pruneflow.compaction.cut import apply_sizes
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")

# timm CNNs (convs with BatchNormAct2d, Conv2dSame, SE gates; ConvNeXt's LayerNorm2d and layer scales): everything
# but the classifier's output is prunable
QUICK = ("test_convnext", "test_efficientnet", "test_mambaout")  # the others are slow-marked: seconds each
PRUNABLE_UP_TO_THE_CLASSIFIER = ("test_byobnet", "test_convnext", "test_convnext2", "test_efficientnet", "test_resnet")


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, num_classes=10)).eval()  # β ≠ 0: a leaking mask would show


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_every_tiny_timm_model_traces_without_raising(name: str) -> None:
    graph = trace_channel_graph(tiny(name))  # what it cannot follow it refuses, space by space, with a reason
    assert graph.spaces and all(space.prunable or space.refusals for space in graph.spaces)


@pytest.mark.parametrize(
    "name",
    [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in timm.list_models("test_*")],
)
def test_a_tiny_timm_model_cuts_to_the_masked_function(name: str) -> None:
    model = tiny(name)
    if not trace_channel_graph(model).prunable:
        return
    images = torch.randn(2, *model.pretrained_cfg["input_size"][-3:])
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()


@pytest.mark.parametrize("name", PRUNABLE_UP_TO_THE_CLASSIFIER)
def test_timm_cnns_are_prunable_up_to_their_classifier(name: str) -> None:
    graph = trace_channel_graph(tiny(name))
    refused = [space for space in graph.spaces if not space.prunable]
    assert [space.refusals for space in refused] == [["reaches the network's output, whose shape would change"]]


def test_norm_act_modules_are_their_convs_norms_and_layer_scales_are_cut_with_the_stream() -> None:
    for name in ("test_byobnet", "test_efficientnet"):
        assert any(type(layer.norm).__name__ == "BatchNormAct2d" for layer in trace_channel_graph(tiny(name)).layers)
    stream = next(space for space in trace_channel_graph(tiny("test_convnext")).spaces if "stem.0" in space.names)
    assert ("stages.0.blocks.0.gamma", 0) in [(scale.name, scale.dim) for scale in stream.scales]


def test_a_cut_timm_model_is_rebuilt_from_its_sizes_its_norm_act_modules_kept() -> None:
    """``apply_sizes`` (export, checkpoints after a cut) rebuilds a taught subclass as its base's tensors, keeping
    its type and activation, with hook tables of its own."""
    model = tiny("test_efficientnet")
    images = torch.randn(2, 3, 32, 32)
    _, compaction = masked_and_cut(model, images)
    fresh = timm.create_model("test_efficientnet", num_classes=10).eval()
    before = fresh.bn1
    apply_sizes(fresh, compaction.sizes).load_state_dict(compaction.model.state_dict())
    assert type(fresh.bn1) is type(model.bn1) and fresh.bn1.num_features < model.bn1.num_features
    assert fresh.bn1._forward_hooks is not before._forward_hooks and fresh.bn1._modules is not before._modules
    with torch.no_grad():
        assert torch.allclose(fresh(images), compaction.model(images), rtol=1e-5, atol=1e-6)
