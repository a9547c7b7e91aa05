"""What the tracer knows of each traced tensor: which spaces its channel dimension carries, at which offsets or
positions, at which dim, and whether a zero channel can have become non-zero on its way (``Value``); what a split
along the channels returns (``Parts``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What a handler returns for an op it does not understand: the walk tries the next handler (a base class's), then
# a reshape probe, then refuses the spaces that reach the op, naming it.
UNKNOWN = object()


@dataclass(frozen=True)
class Value:
    """What a traced tensor's channel dimension carries: (space id, offset) segments, its total width
    (None when part of it is not a channel space), whether it was flattened, the op that made a
    zero channel non-zero, if one did, its number of dimensions, if known, and where its channels
    are: dim 1 (a conv's output) or the last dim (a linear layer's; a ``permute`` moves them)."""

    segments: tuple[tuple[int, int], ...]
    width: int | None
    flattened: bool = False
    revived_by: str | None = None
    ndim: int | None = None  # the tensor's dimensions where known: a flatten or reduction must take all spatial ones
    channels_last: bool = False
    # Position by position, (space id, channel), where the spaces are reordered (a channel shuffle, a ``chunk``
    # of a concatenation); then ``segments`` lists each space once, at offset -1 (read ``layout``, not offsets).
    layout: tuple[tuple[int, int], ...] | None = None
    # Mid-way through a reshape (a shuffle's ``view`` to (N, groups, C/groups, H, W)): ``probe`` is a small tensor
    # of element indices that went through the same ops; nothing but another reshape may read it.
    probe: torch.Tensor | None = field(default=None, compare=False)
    spatial_one: bool = False  # pooled to 1 × 1 (an adaptive pooling): flattened, it is (N, C), not channel-major
    # ``layout`` places channels by position whatever the cut widths (a shuffle, a split at sizes the cut keeps), so
    # the cut must place its spaces' channels; False: the parts of splits whose sizes the cut sets, concatenated
    by_position: bool = False

    def channels_at(self, dim: int) -> bool:
        """Whether the channels are at ``dim`` (negative: from the end); of a 2-D tensor dim 1 is the last."""
        if self.probe is not None:
            return False
        if self.channels_last:
            return dim == -1 or (self.ndim is not None and dim == self.ndim - 1)
        return dim == 1 or (self.ndim is not None and dim == 1 - self.ndim)

    @property
    def read_by_linear(self) -> bool:
        """A linear layer reads the last dim: channels there, or flattened channel-major."""
        return self.flattened or self.channels_at(-1)


@dataclass(frozen=True)
class Parts:
    """What ``chunk``/``split`` along the channels returns: one ``Value`` per part, taken by ``getitem``."""

    parts: tuple[Value | None, ...]


def one_whole_space(value: Value | None) -> bool:
    """Whether ``value`` carries one space, whole, in its own order (what an attention's head width can follow)."""
    return value is not None and value.layout is None and len(value.segments) == 1 and value.segments[0][1] == 0
