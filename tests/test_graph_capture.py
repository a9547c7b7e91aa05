"""A submodule whose forward ``torch.fx`` cannot trace is kept whole (an opaque leaf): the spaces it reads or whose
tensors its output meets are refused in one line naming it, the rest of the model is pruned and cut exactly; only a
model whose own forward cannot be traced is refused whole (issue 31)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_channel_graph import check_masked_and_cut, space_of
from torch import Tensor, nn

from pruneflow.graph import trace_channel_graph
from pruneflow.graph.capture import capture

KEPT_WHOLE = "Gate gate is kept whole: torch.fx cannot trace its forward (TraceError: symbolically traced variables"


class Gate(nn.Module):
    """A branch on a value: ``torch.fx`` cannot trace it, its parent can be traced around it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return self.conv(x)
        return x


class GatedNet(nn.Module):
    """conv1 → conv2 → the gate → conv3 → the head: conv2's channels reach the gate, conv1's and conv3's do not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.gate = Gate(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.gate(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class GateAddedIntoAStream(nn.Module):
    """The gate reads the image (no space) and its output is added into conv1's space: what it writes there is
    unknown, so conv1's space is refused naming the gate, not only the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = Gate(3)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x) + self.gate(x))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class SizedByAGate(nn.Module):
    """conv1's output resized to the gate's output's size: the gate's shape is read, not what it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate(3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(torch.relu(self.conv1(x)), size=self.gate(x[:, :, ::2, ::2]).shape[-2:])
        return self.fc(x.mean((2, 3)))


def test_a_submodule_fx_cannot_trace_is_kept_whole_and_only_the_space_it_reads_is_refused() -> None:
    assert list(capture(GatedNet()).opaque) == ["gate"]
    graph = trace_channel_graph(GatedNet())
    assert {space.name for space in graph.prunable} == {"conv1", "conv3"}
    refused = space_of(graph, "conv2")
    assert len(refused.refusals) == 1 and refused.refusals[0].startswith(KEPT_WHOLE), refused.refusals
    assert "gate.conv" not in {layer.name for layer in graph.layers}  # inside the opaque leaf: never touched


@pytest.mark.parametrize("strategy", ["activation", "weight"])
def test_the_spaces_away_from_an_opaque_leaf_mask_and_cut_to_the_masked_function(strategy: str) -> None:
    graph = check_masked_and_cut(GatedNet(), (3, 8, 8), strategy)
    assert {space.name for space in graph.prunable} == {"conv1", "conv3"}


def test_a_space_an_opaque_leaf_writes_into_is_refused_naming_it() -> None:
    graph = trace_channel_graph(GateAddedIntoAStream())
    written = space_of(graph, "conv1")
    assert written.refusals[0].startswith(KEPT_WHOLE), written.refusals  # the cause first, then the addition's
    assert {space.name for space in graph.prunable} == {"conv2"}


def test_a_space_sized_by_an_opaque_leaf_s_shape_stays_prunable() -> None:
    graph = check_masked_and_cut(SizedByAGate(), (3, 8, 8), "activation")
    assert {space.name for space in graph.prunable} == {"conv1"}
