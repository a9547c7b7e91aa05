"""examples/shufflenet_cut_bound.py: its chunk equations are those of torchvision's ShuffleNetV2 blocks.

Checked against the network itself: a toy stage built with torchvision's own ``channel_shuffle`` and
``chunk``, cut (order kept) at every subset of its offsets. Exactly the subsets the equations accept give a
smaller network that computes the masked one's kept channels, and the dynamic programme finds their sizes.
"""

from __future__ import annotations

import importlib
import itertools
import sys

import torch
from helpers import REPO
from torchvision.models.shufflenetv2 import channel_shuffle

sys.path.insert(0, str(REPO / "examples"))
bound = importlib.import_module("shufflenet_cut_bound")

WIDTH, BLOCKS, INPUTS = 6, 2, 3


def shuffled(*parts: torch.Tensor) -> torch.Tensor:
    """torchvision's ``channel_shuffle(cat(parts), 2)`` of (N, C) features."""
    return channel_shuffle(torch.cat(parts, 1)[:, :, None, None], 2)[:, :, 0, 0]


def stage(weights: list[torch.Tensor], x: torch.Tensor, cut: set[int], remove: bool) -> tuple[torch.Tensor, list[int]]:
    """The toy stage: two linear branches open it (``weights[0:2]``), then ``BLOCKS`` blocks of chunk, a branch
    on the second half (``weights[2:]``), cat and shuffle. ``cut``: offsets cut from the opening branches, the
    rest following as the script derives it; masked (zeroed rows' outputs) or, with ``remove``, removed (rows
    and columns dropped, order kept). Returns the output and the cut positions of the full network's output."""

    def branch(weight: torch.Tensor, rows: set[int], read: torch.Tensor, unread: set[int] = frozenset()):
        if not remove:
            out = read @ weight.T
            out[:, sorted(rows)] = 0
            return out
        kept_rows = [r for r in range(weight.shape[0]) if r not in rows]
        kept_columns = [c for c in range(weight.shape[1]) if c not in unread]
        return read @ weight[kept_rows][:, kept_columns].T

    out = shuffled(branch(weights[0], cut, x), branch(weights[1], cut, x))
    cut_positions = {q for t in cut for q in (2 * t, 2 * t + 1)}
    for block in range(BLOCKS):
        passing, read = out.chunk(2, dim=1)
        passed = {p for p in cut_positions if p < WIDTH}  # cut in the half that passes through
        unread = {p - WIDTH for p in cut_positions if p >= WIDTH}  # cut in the half the branch reads
        out = shuffled(passing, torch.relu(branch(weights[2 + block], passed, read, unread)))
        cut_positions = {q for p in passed for q in (2 * p, 2 * p + 1)}
    return out, sorted(cut_positions)


def test_exactly_the_subsets_the_chunk_equations_accept_cut_the_stage_exactly() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(WIDTH, INPUTS), torch.randn(WIDTH, INPUTS)]
    weights += [torch.randn(WIDTH, WIDTH) for _ in range(BLOCKS)]
    x = torch.randn(5, INPUTS)
    rows = bound.chunk_balances(WIDTH, BLOCKS)
    exact_sizes, balanced_count = set(), 0
    for size in range(WIDTH + 1):
        for subset in map(set, itertools.combinations(range(WIDTH), size)):
            balanced = all(sum(rows[t][k] for t in subset) == 0 for k in range(BLOCKS))
            masked, cut_positions = stage(weights, x, subset, remove=False)
            kept = [p for p in range(2 * WIDTH) if p not in cut_positions]
            try:
                smaller, _ = stage(weights, x, subset, remove=True)
                exact = smaller.shape == masked[:, kept].shape and torch.allclose(smaller, masked[:, kept], atol=1e-5)
            except RuntimeError:  # the halves no longer fit: the smaller network does not even run
                exact = False
            assert exact == balanced, (subset, balanced)
            exact_sizes |= {size} if exact else set()
            balanced_count += balanced
    assert 2 < balanced_count < 2**WIDTH  # some cuts besides none and all are exact, and some are not
    assert sorted(exact_sizes) == bound.feasible_cuts(WIDTH, BLOCKS)
