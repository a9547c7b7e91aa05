"""A timm model ``torch.fx`` cannot trace whole (mobilevit_xxs: its ``MobileVitBlock`` unfolds patches with control
flow on their shapes) is captured: timm declares the block opaque to ``torch.fx`` and the graph keeps it whole, and
where no declaration covers it (another timm version, a user's subclass) the graph keeps it whole by itself: only
the spaces it reads or writes into are refused, naming it, and the others cut exactly (issue 31)."""

from __future__ import annotations

import pytest
import torch
from test_channel_graph import check_masked_and_cut

from pruneflow.graph import registry, trace_channel_graph
from pruneflow.graph.handlers.timm_layers import register_if_imported

timm = pytest.importorskip("timm")
from timm.models.mobilevit import MobileVitBlock  # noqa: E402  (after the skip: timm is an optional extra)

SIZE = 64  # px: the smallest its strides take


def mobilevit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilevit_xxs", num_classes=10)


@pytest.mark.slow
def test_an_untraceable_timm_block_no_one_declared_is_kept_whole_and_the_rest_cuts_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The graph has a rule for MobileViT's block now (``handlers/timm_mobile_blocks``): taken away, so that the block
    # is one the graph was never taught, as a user's own untraceable block is.
    register_if_imported()
    monkeypatch.delitem(registry.MODULE_HANDLERS, MobileVitBlock)
    declared = {space.name for space in trace_channel_graph(mobilevit()).prunable}  # timm's declaration honoured
    monkeypatch.delitem(registry.LEAVES, MobileVitBlock)  # as if timm did not declare it
    model = mobilevit()
    blocks = sorted(name for name, module in model.named_modules() if type(module) is MobileVitBlock)
    graph = check_masked_and_cut(model, (3, SIZE, SIZE), "activation")
    assert declared and {space.name for space in graph.prunable} == declared
    kept_whole = {reason.split(" is kept whole")[0] for space in graph.spaces for reason in space.refusals
                  if "is kept whole: torch.fx cannot trace its forward" in reason}  # fmt: skip
    assert kept_whole == {f"MobileVitBlock {name}" for name in blocks}


def test_the_capture_benchmark_says_how_far_each_way_reaches() -> None:
    from benchmarks.capture import WAYS, measure, table

    row = measure("test_vit", WAYS)  # its own forward calls functions timm declares opaque to torch.fx
    assert row["plain"].startswith("fails: ") and row["fallback"].startswith("fails: ")
    assert row["declared"] == row["both"] == "captured, 0 kept whole"
    assert table([row], WAYS).splitlines()[-1] == "| captured | 0 / 1 | 1 / 1 | 0 / 1 | 1 / 1 |"
