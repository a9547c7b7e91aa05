"""timm's tiny ``test_*`` models: traced without an exception, half of every prunable space masked (L1,
``activation``), cut, and the cut network equal to the masked one; the CNNs built from timm's norm-act modules
(``BatchNormAct2d``) are pruned, not refused."""

from __future__ import annotations

import pytest
import torch
from test_window_attention import masked_and_cut

from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import trace_channel_graph

timm = pytest.importorskip("timm")

# timm CNNs whose every block is a conv → BatchNormAct2d: everything but the classifier's output is prunable
NORM_ACT_CNNS = ("test_byobnet", "test_efficientnet")


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, num_classes=10)).eval()  # β ≠ 0: a leaking mask would show


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_every_tiny_timm_model_traces_and_cuts_to_the_masked_function(name: str) -> None:
    model = tiny(name)
    graph = trace_channel_graph(model)  # never raises: what it cannot follow it refuses, space by space
    assert all(space.prunable or space.refusals for space in graph.spaces)
    if not graph.prunable:
        return
    images = torch.randn(2, *model.pretrained_cfg["input_size"][-3:])
    masked, compaction = masked_and_cut(model, images)
    with torch.no_grad():
        cut = compaction.model(images)
    assert compaction.channels[1] < compaction.channels[0]
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), (cut - masked).abs().max()


@pytest.mark.parametrize("name", NORM_ACT_CNNS)
def test_timm_norm_act_cnns_are_prunable_up_to_their_classifier(name: str) -> None:
    graph = trace_channel_graph(tiny(name))
    refused = [space for space in graph.spaces if not space.prunable]
    assert [space.refusals for space in refused] == [["reaches the network's output, whose shape would change"]]
    assert any(type(layer.norm).__name__ == "BatchNormAct2d" for layer in graph.layers)
