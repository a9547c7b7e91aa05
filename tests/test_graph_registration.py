"""A user teaches the channel graph a layer of their own (``register_leaf``, ``register_module_handler``): it is
traced, masked by the pruning callback, cut, and the cut network computes what the masked one does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from pruneflow import ChannelPruning
from pruneflow.compaction import compact
from pruneflow.compaction.verify import randomize_norms
from pruneflow.graph import UNKNOWN, Tracer, Value, register_module_handler, trace_channel_graph
from pruneflow.graph.leaves import register_leaf
from pruneflow.module import ClassifierModule


class Scale(nn.Module):
    """y = x · w, one weight per channel; its forward branches on the input's rank, which ``torch.fx`` cannot
    trace through: the graph must keep it whole."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            return x * self.weight.view(1, -1, 1, 1)
        return x * self.weight


class ShiftedScale(Scale):
    """y = x · w + 1: a zero channel comes back as 1."""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + 1.0


class Opaque(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flip(1)


register_leaf(Scale, follows=("weight",))
register_leaf(ShiftedScale, follows=("weight",), preserves_zero=False)


def network(scale: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), scale(8),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )  # fmt: skip


def test_a_registered_leaf_is_traced_masked_by_the_callback_cut_and_equal_to_the_masked_network() -> None:
    torch.manual_seed(0)
    model = randomize_norms(network(Scale))  # β ≠ 0, so a leaking mask would show
    space = trace_channel_graph(model).spaces[0]
    assert space.prunable and [(s.name, s.dim) for s in space.scales] == [("3.weight", 0)]
    images = torch.randn(32, 3, 6, 6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(32) % 5), batch_size=8)
    pruning = ChannelPruning(strategy="activation", amount=0.5, at_step=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(ClassifierModule(model, lambda params: torch.optim.SGD(params, lr=0.1), num_classes=5), loader)
    assert int(pruning.pruned["0"].sum()) == 4
    model.eval()
    with torch.no_grad():
        masked = model(images)
        compaction = compact(model, pruning.pruned)
        cut = compaction.model(images)
    assert compaction.model[3].weight.shape == (4,) and compaction.model[4].weight.shape[1] == 4
    kept = (~pruning.pruned["0"]).nonzero().flatten()
    assert torch.equal(compaction.model[3].weight.detach(), model[3].weight.detach()[kept])
    assert torch.allclose(cut, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())


def test_a_leaf_that_revives_a_zero_channel_refuses_the_space_its_reader_reads() -> None:
    (space, *_) = trace_channel_graph(network(ShiftedScale)).spaces
    assert not space.prunable
    assert "ShiftedScale 3" in space.refusals[0] and "f(0) ≠ 0 before 4 reads it" in space.refusals[0]


def test_a_handler_registered_for_a_user_module_decides_and_unknown_falls_back_to_a_refusal() -> None:
    seen: list[str] = []

    def refuse_then_pass(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> object:
        seen.append(str(node.target))
        return UNKNOWN

    register_module_handler(Opaque, refuse_then_pass)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Opaque(), nn.Conv2d(4, 2, 1))
    (space, _) = trace_channel_graph(model).spaces
    assert seen == ["1"]  # kept whole (a leaf), asked once
    assert space.refusals == ["reaches Opaque 1, whose effect on channels is not understood"]


def test_register_leaf_rejects_a_channel_dim_the_graph_does_not_follow_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"channel_dim=2; the graph follows channels at dim 1 or -1") as error:
        register_leaf(Opaque, channel_dim=2)
    assert "\n" not in str(error.value)
