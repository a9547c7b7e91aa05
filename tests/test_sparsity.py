"""Sparse training (``mask.regularizer``): the penalty drives a planted group toward zero at every member and leaves
the others, and its TensorBoard tags show it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pruneflow import ChannelPruning
from pruneflow.errors import ConfigError
from pruneflow.graph import trace_channel_graph
from pruneflow.pruning.selection import select_spaces
from pruneflow.pruning.sparsity import SparseTraining

PLANTED = 2
LR, STRENGTH, STEPS = 0.1, 0.05, 40  # each step takes LR·STRENGTH = 0.005 off every group's norm


class Pair(nn.Module):
    """``a`` writes 4 channels that ``b`` reads; channel ``PLANTED`` starts 20 times weaker at both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(0.2)
            self.b.weight.fill_(0.1)
            self.a.weight[PLANTED] /= 20
            self.b.weight[:, PLANTED] /= 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def group_norms(self) -> torch.Tensor:
        """Measured from the weights themselves: each channel's producer row and consumer columns together."""
        rows = self.a.weight.detach().flatten(1).pow(2).sum(1)
        columns = self.b.weight.detach().transpose(0, 1).flatten(1).pow(2).sum(1)
        return (rows + columns).sqrt()


class NoTask(L.LightningModule):
    """A loss with a zero gradient: whatever moves the weights is the regulariser."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).sum() * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_group_lasso_drives_the_planted_group_to_zero_at_every_member_and_leaves_the_others(tmp_path: Path) -> None:
    module = NoTask()
    before = module.model.group_norms()
    pruning = ChannelPruning("activation", amount=0.5, at_epoch=5, regularizer="group_lasso",
                             regularizer_strength=STRENGTH, log_every_n_steps=5)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, callbacks=[pruning], logger=TensorBoardLogger(tmp_path, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", log_every_n_steps=5)  # fmt: skip
    images = torch.randn(STEPS, 1, 6, 6)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images), batch_size=1))
    after = module.model.group_norms()
    others = [c for c in range(4) if c != PLANTED]
    assert after[PLANTED] < 0.2 * before[PLANTED], (before, after)  # within one step's size of zero
    assert (after[others] > 0.6 * before[others]).all(), (before, after)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "sparsity/group_norms" in events.Tags()["histograms"]
    assert "sparsity/fraction_below" in events.Tags()["scalars"]
    assert events.Scalars("sparsity/fraction_below")[-1].value == pytest.approx(0.25)  # the planted 1 of 4


def test_bn_l1_shrinks_the_planted_gamma_and_leaves_the_others() -> None:
    network = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with torch.no_grad():
        network[1].weight.copy_(torch.tensor([1.0, 1.0, 0.05, 1.0]))
    spaces = select_spaces(trace_channel_graph(network).spaces, None)
    sparsity = SparseTraining("bn_l1", STRENGTH, None)
    sparsity.bind(network, spaces)
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        sparsity.add_gradients()
        optimizer.step()
    gamma = network[1].weight.detach().abs()
    assert gamma[PLANTED] < 0.2 * 0.05
    assert (gamma[[0, 1, 3]] > 0.7).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regularizer": "l0"}, "unknown mask.regularizer 'l0'; choose one of: group_lasso, bn_l1"),
        ({"regularizer": "bn_l1", "regularizer_strength": 0}, "mask.regularizer_strength must be a number > 0"),
        ({"regularizer": "bn_l1", "regularizer_epochs": 0}, "mask.regularizer_epochs must be a positive integer"),
    ],
)
def test_bad_regularizer_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ChannelPruning("activation", **kwargs)
