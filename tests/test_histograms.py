"""Pruned-kernel histograms binned by PyTorch: the counts, range and moments TensorBoard receives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from pruneflow.pruning.dashboard import HISTOGRAM_BINS, add_histogram


def read_histogram(folder: Path, tag: str):
    events = EventAccumulator(str(folder), size_guidance={"histograms": 0})
    events.Reload()
    return events.Histograms(tag)[-1].histogram_value


def test_histogram_counts_range_and_moments_match_numpy(tmp_path: Path) -> None:
    values = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    with SummaryWriter(tmp_path) as writer:
        add_histogram(writer, "k", values, step=3)
    histogram = read_histogram(tmp_path, "k")
    flat = values.flatten().double().numpy()
    expected, edges = np.histogram(flat, bins=HISTOGRAM_BINS, range=(flat.min(), flat.max()))
    assert histogram.bucket == list(expected.astype(float))
    np.testing.assert_allclose(histogram.bucket_limit, edges[1:], rtol=1e-5)
    assert (histogram.min, histogram.max, histogram.num) == (
        float(values.min()),
        float(values.max()),
        float(values.numel()),
    )
    np.testing.assert_allclose([histogram.sum, histogram.sum_squares], [flat.sum(), (flat**2).sum()], rtol=1e-5)


def test_a_kernel_held_at_zero_is_one_spike_at_zero(tmp_path: Path) -> None:
    with SummaryWriter(tmp_path) as writer:
        add_histogram(writer, "zero", torch.zeros(4, 3, 3, 3), step=0)
        add_histogram(writer, "empty", torch.zeros(0), step=0)  # nothing pruned: nothing written
    histogram = read_histogram(tmp_path, "zero")
    assert (histogram.min, histogram.max, histogram.num, histogram.sum_squares) == (0.0, 0.0, 108.0, 0.0)
    assert histogram.bucket[0] == 108 and sum(histogram.bucket) == 108
