"""Issue 31's timm patterns on tiny networks written here: a module called more than once (CoaT's parallel block
applies one MLP to several streams), pruned like one call where every call reads the same space and refused in one
line where the calls read different spaces; and a split of a space by constant sizes whose owner's sizes the cut
can set (FasterNet's partial conv, CSPDarkNet's cross stage), each part cut on its own and the split's sizes set to
the channels each part keeps."""

from __future__ import annotations

import torch
from test_graph_cnn_rules import conv_bn, head
from test_graph_defects import assert_cut_equals_masked
from torch import Tensor, nn

from pruneflow.graph import trace_channel_graph


def mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, width, 1))


class SharedMlp(nn.Module):
    """CoaT's parallel block: one MLP added to two streams that a residual made one space."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm_a, self.norm_b = conv_bn(3, 8), conv_bn(3, 8), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.mlp, self.head = mlp(8, 12), head(8)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        a = a + b
        a = a + self.mlp(self.norm_a(a))
        b = b + self.mlp(self.norm_b(b))
        return self.head(a + b)


class MlpOnTwoSpaces(nn.Module):
    """One MLP on two streams that are different spaces: no cut of its columns fits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mlp, self.head = conv_bn(3, 8), conv_bn(3, 8), mlp(8, 12), head(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.mlp(self.a(x)), self.mlp(self.b(x))], dim=1))


def test_a_module_called_on_one_space_several_times_is_pruned_like_one_call() -> None:
    graph = trace_channel_graph(SharedMlp())
    stream = next(space for space in graph.spaces if "a.0" in space.names)
    hidden = next(space for space in graph.spaces if "mlp.0" in space.names)
    assert stream.prunable and hidden.prunable, (stream.refusals, hidden.refusals)
    assert sorted(stream.names) == ["a.0", "b.0", "mlp.2"]  # mlp.2 once, though called twice
    assert [consumer.name for consumer in hidden.consumers] == ["mlp.2"]
    assert_cut_equals_masked(SharedMlp())


def test_a_module_called_on_different_spaces_refuses_them_in_one_line() -> None:
    graph = trace_channel_graph(MlpOnTwoSpaces())
    reason = "mlp.0 is called 2 times on different channel spaces"
    for name in ("a.0", "b.0"):
        space = next(space for space in graph.spaces if name in space.names)
        assert len(space.refusals) == 1 and reason in space.refusals[0], space.refusals
    hidden = next(space for space in graph.spaces if "mlp.0" in space.names)
    assert reason in hidden.refusals  # and mlp.2's, which reads it and the second call's hidden space
