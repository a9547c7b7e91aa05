"""TensorBoard pictures of the pruned layers, beside the telemetry scalars.

Per pruned layer:

- ``pruned_kernels/<layer>`` (Histograms tab, every telemetry logging step): the values of the pruned
  channels' producing kernels as the forward pass uses them — a spike at 0 while they stay pruned,
  spreading as they drift; ``pruned_kernels_stored/<layer>`` the stored weight where a
  parametrization separates the two (``mask=parametrize``: effective kernels stay zero while the
  stored ones move). Binned by ``torch.histc`` on the device and fetched in one transfer per
  histogram: TensorBoard's own ``add_histogram`` bins with NumPy, whose BLAS threads spin on the
  cores PyTorch is training on (on 2 cores, telemetry every step ran 3× slower because of it);
- ``channel_mask/<layer>`` (Images tab, at the first logging step after each pruning event, when
  the mask changed): the layer's output channels, in rows of ``CHANNELS_PER_ROW`` read left to
  right, white kept, black pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from pruneflow.graph import PrunableLayer
from pruneflow.pruning.strategies import MaskStrategy

CHANNELS_PER_ROW = 32
CELL_PIXELS = 8  # each channel a square this wide, with a one-pixel grey border
HISTOGRAM_BINS = 30


@torch.no_grad()
def add_histogram(writer: SummaryWriter, tag: str, values: Tensor, step: int, bins: int = HISTOGRAM_BINS) -> None:
    """``writer.add_histogram`` binned by PyTorch where ``values`` live, with one device→host transfer."""
    values = values.detach().flatten().float()
    if values.numel() == 0:
        return
    low, high = values.min(), values.max()
    top = torch.where(high > low, high, low + 1e-6)  # all equal (a pruned kernel at 0): one narrow bin
    stats = torch.stack([low, high, top, values.sum(), values.square().sum()])
    fetched = torch.cat([stats, _histc(values, low, top, bins)]).cpu().tolist()
    (minimum, maximum, top_edge, total, squares), counts = fetched[:5], fetched[5:]
    width = (top_edge - minimum) / bins
    limits = [minimum + width * (i + 1) for i in range(bins)]
    writer.add_histogram_raw(tag, minimum, maximum, values.numel(), total, squares, limits, counts, step)


def _histc(values: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [low, high], with tensor bounds (no host sync)."""
    index = ((values - low) / (high - low) * bins).long().clamp_(0, bins - 1)
    return torch.zeros(bins, device=values.device).index_add_(0, index, torch.ones_like(values))


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
    writer: SummaryWriter,
    masked: Sequence[tuple[PrunableLayer, Tensor]],
    strategy: MaskStrategy,
    step: int,
    mask_images: bool = True,
) -> None:
    """Histograms of each masked layer's pruned kernels, and (``mask_images``) an image of its channel mask."""
    for layer, pruned in masked:
        add_histogram(writer, f"pruned_kernels/{layer.name}", layer.producer.weight[pruned], step)
        stored = strategy.stored_weight(layer)
        if stored is not None:
            add_histogram(writer, f"pruned_kernels_stored/{layer.name}", stored[pruned], step)
        if mask_images:
            writer.add_image(f"channel_mask/{layer.name}", channel_mask_image(pruned), step)
