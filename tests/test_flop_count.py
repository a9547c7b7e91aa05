"""compaction.cost.count_flops on networks whose forward trips torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruneflow.compaction.cost import count_flops


class _Block(nn.Module):
    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return x + token


class _WithToken(nn.Module):
    """A parameter expanded into a block's input, as timm's CaiT feeds its class token to its class-attention
    blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.token, self.block, self.head = nn.Parameter(torch.zeros(1, 4)), _Block(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x, self.token.expand(x.shape[0], -1)))


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_flops_are_counted_where_a_parameter_expanded_feeds_a_block(grad_mode: type) -> None:
    network = _WithToken()
    with grad_mode():
        assert count_flops(network, torch.zeros(1, 4)) == 16  # the head's 2 × 4 multiply-adds, twice
    assert network.token.requires_grad and network.head.weight.requires_grad  # restored
