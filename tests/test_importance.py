"""Importance over whole coupled groups (``mask.group_reduction``) and the FPGM and LAMP criteria: each reading
checked on weights planted so that leaving out a member, or reducing the wrong way, picks other channels."""

from __future__ import annotations

import pytest
import torch
from test_selection import fit, tiny_module
from torch import nn

from pruneflow import ChannelPruning
from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, trace_channel_graph
from pruneflow.pruning.criteria import Criterion, select_channels
from pruneflow.pruning.importance import lamp_scores, make_importance


class ProducerConsumer(nn.Module):
    """``a`` writes 4 channels, ``b`` reads them (and is the output, so only ``a``'s space is prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def planted(rows: list[float], columns: list[float]) -> tuple[ProducerConsumer, ChannelSpace]:
    """Channel c: producer row of magnitude ``rows[c]``, consumer column of magnitude ``columns[c]``."""
    network = ProducerConsumer()
    with torch.no_grad():
        network.a.weight.copy_(torch.tensor(rows).view(4, 1, 1, 1))
        network.b.weight.copy_(torch.tensor(columns).view(1, 4, 1, 1).expand(2, 4, 1, 1))
    space = next(space for space in trace_channel_graph(network).spaces if space.prunable)
    return network, space


def lowest(criterion: Criterion, network: nn.Module, space: ChannelSpace, count: int) -> list[int]:
    criterion.bind(network)
    pruned = select_channels(criterion.scores(space), count, torch.zeros(space.width, dtype=torch.bool))
    return pruned.nonzero().flatten().tolist()


@pytest.mark.parametrize("name", ["l1", "l2", "lamp"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_a_group_score_reads_the_consumers_columns_too(name: str, reduction: str) -> None:
    # every producer row alike: only the consumer's columns tell channels 2 and 3 (the weakest) from 0 and 1
    network, space = planted([1.0, 1.0, 1.0, 1.0], [0.9, 0.8, 0.1, 0.2])
    assert lowest(make_importance(name, reduction), network, space, 2) == [2, 3]


def test_the_reduction_is_the_one_named() -> None:
    # producer row L1 (3, 0, 2.5, 3) and consumer column L1 over its 2 rows (0, 3, 2.5, 0.5):
    # mean (1.5, 1.5, 2.5, 1.75) keeps 2; max (3, 3, 2.5, 3) prunes it; sum (3, 3, 5, 3.5) like mean
    network, space = planted([3.0, 0.0, 2.5, 3.0], [0.0, 1.5, 1.25, 0.25])
    assert lowest(make_importance("l1", "mean"), network, space, 1) == [0]
    assert lowest(make_importance("l1", "max"), network, space, 1) == [2]
    assert lowest(make_importance("l1", "sum"), network, space, 1) == [0]


def test_fpgm_prunes_the_channel_nearest_the_others_geometric_median() -> None:
    network = nn.Sequential(nn.Conv2d(1, 5, 1, bias=False), nn.ReLU(), nn.Conv2d(5, 2, 1, bias=False))
    with torch.no_grad():
        network[0].weight.copy_(torch.tensor([0.0, 1.0, 2.0, 4.0, 10.0]).view(5, 1, 1, 1))
    space = next(space for space in trace_channel_graph(network).spaces if space.prunable)
    # summed distances to the others: 17, 14, 13, 15, 33 — channel 2 is the median; L1 would prune channel 0
    assert lowest(make_importance("fpgm"), network, space, 1) == [2]
    assert lowest(make_importance("l1"), network, space, 1) == [0]


def test_lamp_divides_each_score_by_the_sum_of_those_not_below_it() -> None:
    scores = lamp_scores(torch.tensor([4.0, 1.0, 3.0, 2.0]))
    assert torch.allclose(scores, torch.tensor([4 / 4, 1 / 10, 3 / 7, 2 / 9]), rtol=1e-6)
    tied = lamp_scores(torch.tensor([2.0, 2.0, 1.0]))
    assert torch.allclose(tied, torch.tensor([2 / 4, 2 / 4, 1 / 5]), rtol=1e-6)


def test_group_taylor_sums_weight_times_gradient_at_every_member() -> None:
    network, space = planted([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    criterion = make_importance("taylor", "mean", taylor_batches=1)
    criterion.bind(network)
    assert not criterion.ready()  # starts gathering
    network.a.weight.grad = torch.full_like(network.a.weight, 0.5)  # the producer: every channel alike
    network.b.weight.grad = torch.tensor([2.0, 3.0, 0.1, 0.2]).view(1, 4, 1, 1).expand(2, 4, 1, 1).clone()
    criterion.before_optimizer_step(space.producers)
    assert criterion.ready()
    pruned = select_channels(criterion.scores(space), 2, torch.zeros(4, dtype=torch.bool))
    assert pruned.nonzero().flatten().tolist() == [2, 3]


def test_group_bn_gamma_reduces_over_every_norm_of_a_coupled_space() -> None:
    from pruneflow.models import ResNet

    network = ResNet(depth=8).eval()  # conv1 and layer1.0.conv2 write one coupled space, each with its norm
    space = next(space for space in trace_channel_graph(network).spaces if space.names[0] == "conv1")
    assert len(space.producers) == 2
    with torch.no_grad():
        for norm, gammas in ((network.bn1, {5: 0.05, 9: 0.5}), (network.layer1[0].bn2, {5: 0.9, 9: 0.5})):
            norm.weight.fill_(1.0)
            for channel, gamma in gammas.items():
                norm.weight[channel] = gamma
    # channel 5: weakest at one norm (mean 0.475, max 0.9); channel 9: middling at both (0.5, 0.5)
    assert lowest(make_importance("bn_gamma", "mean"), network, space, 1) == [5]
    assert lowest(make_importance("bn_gamma", "max"), network, space, 1) == [9]
    assert lowest(make_importance("bn_gamma", "producers"), network, space, 1) == [5]


@pytest.mark.parametrize("criterion", ["fpgm", "lamp"])
def test_the_new_criteria_prune_in_a_training_run(criterion: str) -> None:
    pruning = ChannelPruning("activation", amount=0.5, criterion=criterion, group_reduction="mean")
    fit(tiny_module(), pruning)
    assert all(int(mask.sum()) > 0 for mask in pruning.pruned.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_reduction": "median"}, "unknown mask.group_reduction 'median'; choose one of: producers, mean"),
        ({"criterion": "random", "group_reduction": "mean"}, "which mask.criterion=random does not score"),
        ({"criterion": "magnitude"}, "unknown mask.criterion 'magnitude'; choose one of: l1, l2, random, bn_gamma"),
    ],
)
def test_bad_group_settings_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ChannelPruning("activation", **kwargs)
