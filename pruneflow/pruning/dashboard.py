"""TensorBoard pictures of the pruned layers, beside the telemetry scalars.

Per pruned layer, at every telemetry logging step:

- ``pruned_kernels/<layer>`` (Histograms tab): the values of the pruned channels' producing kernels as
  the forward pass uses them — a spike at 0 while they stay pruned, spreading as they drift;
  ``pruned_kernels_stored/<layer>`` the stored weight where a parametrization separates the two
  (``mask=parametrize``: effective kernels stay zero while the stored ones move);
- ``channel_mask/<layer>`` (Images tab): the layer's output channels, in rows of ``CHANNELS_PER_ROW``
  read left to right, white kept, black pruned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from pruneflow.pruning.channels import PrunableLayer
from pruneflow.pruning.strategies import MaskStrategy

log = logging.getLogger(__name__)

CHANNELS_PER_ROW = 32
CELL_PIXELS = 8  # each channel a square this wide, with a one-pixel grey border


def channel_mask_image(pruned: Tensor) -> Tensor:
    """A (1, H, W) grey image of a channel mask: white kept, black pruned, grey past the last channel."""
    channels = pruned.numel()
    columns = min(channels, CHANNELS_PER_ROW)
    rows = -(-channels // columns)
    cells = torch.full((rows * columns,), 0.5)
    cells[:channels] = (~pruned.cpu().bool()).float()
    image = cells.view(rows, columns).repeat_interleave(CELL_PIXELS, 0).repeat_interleave(CELL_PIXELS, 1)
    image[::CELL_PIXELS, :] = 0.5
    image[:, ::CELL_PIXELS] = 0.5
    return image.unsqueeze(0)


@torch.no_grad()
def log_pruned_layers(
    writer: SummaryWriter, masked: Sequence[tuple[PrunableLayer, Tensor]], strategy: MaskStrategy, step: int
) -> None:
    """Histograms of each masked layer's pruned kernels and an image of its channel mask."""
    for layer, pruned in masked:
        writer.add_histogram(f"pruned_kernels/{layer.name}", layer.conv.weight[pruned].float().cpu(), step)
        stored = strategy.stored_weight(layer)
        if stored is not None:
            writer.add_histogram(f"pruned_kernels_stored/{layer.name}", stored[pruned].float().cpu(), step)
        writer.add_image(f"channel_mask/{layer.name}", channel_mask_image(pruned), step)
