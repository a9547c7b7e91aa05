"""The channel graph's records: the spaces a trace finds and what reads and writes each of them.

A ``ChannelSpace`` is a set of channels that share an index everywhere they flow; its producers
(``PrunableLayer``) write them, its consumers (``Consumer``) read them, its points (``ChannelPoint``) are norms
(or depthwise convs) reading it among other channels, its scales (``ChannelScale``) per-channel parameters
multiplied into it. ``ChannelGraph`` holds every space of a model. The package docstring carries the physics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow.graph.layers import is_depthwise, norm_width


@dataclass(frozen=True)
class Consumer:
    """A weight that reads a space's channels along its input dimension (dim 1).

    ``kind`` "conv" (input slice ``weight[:, c]``), "linear" (feature block of ``features_per_channel``
    features per channel, channel-major as a flatten orders them) or "grouped" (a grouped conv with
    ``block`` input channels per group: its rows of group g read the g-th block of the space, channel c
    at column ``c mod block``; the space is cut at the same positions in every block, so those columns
    go from all rows); ``offset``: where the space starts in the consumer's input (after a ``torch.cat``).
    """

    name: str
    kind: str
    features_per_channel: int = 1
    offset: int = 0
    block: int = 0
    # channel c → the column reading it, -1: not read here — where the space reaches the consumer reordered
    # (a channel shuffle, a ``chunk``: ``_Value.layout``), instead of at ``offset``
    at: tuple[int, ...] = ()

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along the consumer weight's input dimension (dim 1) that read the given channels."""
        if self.at:
            return _placed(self.at, channels)
        if self.kind == "grouped":
            return torch.unique(channels % self.block)
        k = self.features_per_channel
        first = (channels + self.offset) * k
        return (first.view(-1, 1) + torch.arange(k, device=channels.device)).flatten()


@dataclass(frozen=True, eq=False)
class ChannelPoint:
    """A norm that reads a space among other channels — a BatchNorm after a concatenation (DenseNet's
    pre-activation ``norm1``) or an addition, a LayerNorm over a residual stream (ConvNeXt's) — so it
    belongs to no producer. It writes β into every channel, so the space's channel ``c`` is masked again
    at its output, at ``offset + c``, and a cut removes its entry ``offset + c``. ``shape`` broadcasts a
    vector of its channels over its output: (1, C, 1, 1) at dim 1, (C,) at the last dim."""

    name: str
    module: nn.Module
    offset: int
    shape: tuple[int, ...]
    at: tuple[int, ...] = ()  # channel c → its entry, -1: not read here (a reordered space, as ``Consumer.at``)
    # entries per channel, consecutive: channel c is entries offset + c·k … offset + c·k + k − 1 (the rows a grouped
    # conv with a channel multiplier k writes from channel c, and whatever reads those rows: ``handlers.multipliers``)
    per_channel: int = 1
    # False: a layer over another dim than the channels whose bias revives every channel (CoaT's ``aggregate``, a
    # conv of kernel 1 over its scales' class tokens): masked again at its output, it holds no entry per channel,
    # so the cut leaves it as it is; its width is the space's at its output (``shape``)
    entries: bool = True

    @property
    def width(self) -> int:
        return norm_width(self.module) if self.entries else math.prod(self.shape)

    def channels(self, channels: torch.Tensor) -> torch.Tensor:
        """The norm's entries that carry the space's ``channels`` (those it reads)."""
        return _entries(self.at, self.offset, self.per_channel, channels)

    def placed(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the space's channels this point reads, their entries) for a space of ``width`` channels; a channel of
        several entries (``per_channel``) is listed once for each."""
        channels = torch.arange(width)
        if not self.at:
            return channels.repeat_interleave(self.per_channel), self.channels(channels)
        entries = torch.tensor(self.at)
        return channels[entries >= 0], entries[entries >= 0]


def _entries(at: tuple[int, ...], offset: int, per_channel: int, channels: torch.Tensor) -> torch.Tensor:
    """Where ``channels`` are read: ``at[c]`` where placed so, else the ``per_channel`` entries from
    ``offset + c · per_channel`` on."""
    if at:
        return _placed(at, channels)
    k = per_channel
    return (channels.view(-1, 1) * k + torch.arange(k, device=channels.device)).flatten() + offset


def _placed(at: tuple[int, ...], channels: torch.Tensor) -> torch.Tensor:
    """``at[c]`` for each of ``channels`` that is read (``at[c] >= 0``)."""
    entries = torch.tensor(at, device=channels.device).index_select(0, channels.long())
    return entries[entries >= 0]


@dataclass(frozen=True, eq=False)
class ChannelScale:
    """A per-channel parameter read outside its module and multiplied into a space (ConvNeXt's
    ``layer_scale``, shape (C, 1, 1)): a zero channel stays zero, and a cut slices entry ``offset + c``
    of the parameter ``name`` along its ``dim`` (0 or 1) with the space's channel ``c``."""

    name: str
    dim: int
    offset: int
    # channel c → its entry, -1: no entry (BEiT's ``q_bias``: the q rows of a q/k/v space only), as ``Consumer.at``
    at: tuple[int, ...] = ()
    per_channel: int = 1  # consecutive entries per channel, as ``ChannelPoint.per_channel``

    def channels(self, channels: torch.Tensor) -> torch.Tensor:
        """The parameter's entries along ``dim`` that carry the space's ``channels``."""
        return _entries(self.at, self.offset, self.per_channel, channels)


@dataclass(frozen=True, eq=False)
class ChannelSource:
    """A parameter that writes a space's channels itself, added into the stream or concatenated with it along
    another dim (a ViT's ``pos_embed``, ``cls_token``): entry ``offset + c`` along its ``dim`` is channel ``c`` in
    every token it writes. A pruned channel stays 0 only if these entries are 0 (the ``activation`` strategy
    multiplies ``owner.attribute`` by the keep mask); a cut slices them with the space's channels."""

    name: str
    owner: nn.Module = field(repr=False)
    attribute: str
    dim: int
    offset: int

    def channels(self, channels: torch.Tensor) -> torch.Tensor:
        """The parameter's entries along ``dim`` that carry the space's ``channels``."""
        return channels + self.offset


@dataclass(frozen=True)
class SplitSizes:
    """A split of a space's channels, whole and in order, into parts of constant ``sizes`` by the forward of module
    ``owner``, whose attributes hold them (``register_split_sizes``): each part is cut on its own, and the cut sets
    the owner's attributes to the channels each part keeps."""

    owner: str
    sizes: tuple[int, ...]
    start: int = 0  # where the split space's channels are in this one (embedded in it: ``handlers.slices``)

    def kept(self, kept: torch.Tensor) -> list[int]:
        """How many of the ``kept`` channels each part holds."""
        bounds = torch.tensor([self.start + sum(self.sizes[: i + 1]) for i in range(len(self.sizes))])
        inside = kept[(kept >= self.start) & (kept < bounds[-1])]
        return torch.bincount(torch.bucketize(inside, bounds, right=True), minlength=len(self.sizes)).tolist()


@dataclass(eq=False)
class PrunableLayer:
    """One producer of a channel space — a conv (dense or depthwise) or a linear layer — with its norm.

    ``producer``: the module that writes the channels, a conv or a linear layer.
    """

    name: str
    producer: nn.Module
    norm_name: str | None = None
    norm: nn.Module | None = None  # a BatchNorm, or a LayerNorm over the channels
    space: ChannelSpace | None = field(default=None, repr=False)
    # A producer never called as a module (a Swin attention's ``qkv`` and ``proj``, BEiT's and EVA's ``qkv`` with q and
    # v biases, whose weights the attention reads itself): the module whose output completes its channels, the
    # attention.
    unit_name: str | None = None
    unit: nn.Module | None = field(default=None, repr=False)
    # Rows the unit reads itself, masked by computing it again (not a head's q/k/v rows): an LSTM's gate rows, which
    # its recurrence reads before any output a hook could mask
    rows_inside_unit: bool = False

    @property
    def channel_point_name(self) -> str:
        return self.unit_name or self.norm_name or self.name

    @property
    def channel_point(self) -> nn.Module:
        """Where the channel is complete: the norm after the producer, else the producer itself (or the attention
        that calls it)."""
        return self.unit if self.unit is not None else self.norm if self.norm is not None else self.producer

    @property
    def inside_unit(self) -> bool:
        """An attention's ``qkv``: its channels live inside the attention, whose output is another space's (a single
        head's too, where its rows are tied to the stream: PVT-v2's first stage; heads pruned in blocks: TNT's), an
        LSTM's gate rows."""
        space = self.space
        return self.unit is not None and space is not None and (
            space.head_rows or space.heads_of is not None or self.rows_inside_unit
        )

    @property
    def num_channels(self) -> int:
        return int(self.producer.weight.shape[0])

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """The shape a per-channel vector takes to broadcast over the channel point's output: (1, C, 1, 1)
        after a Conv2d, (1, C, 1) after a Conv1d, (C,) after a linear layer (its features are the last dim)."""
        if isinstance(self.producer, nn.Linear):
            return (self.num_channels,)
        return (1, self.num_channels, *([1] * (self.producer.weight.ndim - 2)))

    @property
    def depthwise(self) -> bool:
        return is_depthwise(self.producer)

    @property
    def consumers(self) -> list[Consumer]:
        return self.space.consumers if self.space is not None else []

    @property
    def coupled(self) -> bool:
        return self.space is not None and self.space.coupled

    @property
    def consumers_complete(self) -> bool:
        """Whether every reader of the layer's channels is known (its space is prunable)."""
        return self.space is not None and self.space.prunable


@dataclass(eq=False)
class RopeFrequencies:
    """A rotary position embedding's table of frequencies (``owner``, a module), read by the attentions ``spaces``
    (their q/k/v rows, tied to their streams): head position ``at[p]`` of q and k in every head of each is rotated by
    frequency ``at[p]``, in a pair with another position of the same frequency (an axis each). q·k sums those pairs,
    each rotated by its own angle, so a frequency whose positions are cut from q and k in every head of every
    attention, and from the table, leaves every other pair's rotation as it was."""

    owner: str
    at: tuple[int, ...]
    spaces: list[ChannelSpace] = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        """Its frequencies."""
        return max(self.at) + 1

    @property
    def positions(self) -> int:
        """The head positions each frequency rotates (a pair on each axis)."""
        return len(self.at) // self.count


@dataclass(eq=False)
class ChannelSpace:
    """Channels that share an index from their producers to their consumers; see the module docstring."""

    width: int
    producers: list[PrunableLayer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    coupled: bool = False
    refusals: list[str] = field(default_factory=list)
    points: list[ChannelPoint] = field(default_factory=list)  # norms reading it among other channels
    scales: list[ChannelScale] = field(default_factory=list)  # per-channel parameters multiplied into it
    sources: list[ChannelSource] = field(default_factory=list)  # parameters added into it or concatenated with it
    # (module, attribute) holding its width as a number the forward reshapes by (torchvision's ViT ``hidden_dim``):
    # the cut sets each to the kept width; (module, attribute, n) to the kept width / n (a head width of n heads
    # the space is cut in whole blocks of: GCViT's global query)
    held_by: list[tuple[str, str] | tuple[str, str, int]] = field(default_factory=list)
    # Written or read by a grouped conv: cut at the same positions in each of ``groups`` equal blocks, so
    # every group keeps its width and a reader's columns are the same for all its groups.
    groups: int = 1
    # Normalised in groups of ``block`` consecutive channels (a GroupNorm of several groups): pruned in whole blocks
    # only, so every kept group's mean and variance stay its own, and the cut norm keeps the groups it keeps.
    block: int = 1
    # Reordered on its way (a channel shuffle, a ``chunk``): its channels by **route** (the names of the modules
    # that read them). A cut that keeps the network's shuffles has, at a smaller width, its own number of slots on
    # each route (``route_slots``, by pruned share), so the criteria keep at most that many channels of each
    # route (``Criterion.select``). Empty: every channel goes the same way.
    routes: dict[tuple[str, ...], tuple[int, ...]] = field(default_factory=dict)
    route_slots: Callable[[float], dict[tuple[str, ...], int]] | None = field(default=None, repr=False, compare=False)
    # Reordered by position (a shuffle, a split the cut keeps at its sizes): the cut places its channels on the slots
    # of their routes. Its routes otherwise come from ``splits`` only, whose sizes the cut sets: each part is cut on
    # its own, its kept channels in order.
    reordered: bool = False
    splits: list[SplitSizes] = field(default_factory=list)
    # An attention's q, k and v rows (``qkv``, 3 × heads × head width): each head keeps as many query/key positions
    # (cut from q and k alike) as value positions, and as many as every other head: ``heads``. Its head width
    # follows its input's width, so it is pruned with that space (``tied_to``), and that one in multiples of
    # ``multiple`` channels (the heads of every attention reading it), kept / heads per head.
    heads: int = 1
    # The q/k/v rows per head position: 3 where one ``qkv`` layer writes q, k and v (all heads' q rows, then k, then
    # v), 1 where separate q, k and v layers write them, coupled: a position is cut from all three (CaiT's ClassAttn).
    parts: int = 3
    # Its heads' outputs read head-minor (NesT's ``permute(0, 2, 3, 4, 1)``: position p of head h at column p · heads +
    # h), an order the cut keeps only where every head keeps the same value positions
    values_alike: bool = False
    head_width_of: str | None = None  # the attention whose ``head_dim`` the cut sets (MaxViT's; Swin's follows)
    # Pruned in whole heads only, not tied to any stream (timm's ``Attention``: its head width is its own): each head
    # loses all its q, k and v rows or none, and the cut sets ``num_heads`` and ``attn_dim`` of ``heads_of``.
    whole_heads: bool = False
    heads_of: str | None = None
    # the attributes of ``heads_of`` holding its head count and the width of all its heads (Hiera's: heads, dim_out)
    # (None: the attention reads that width from its input, a stream it is tied to: DaViT's channel attention)
    head_attributes: tuple[str, str | None] = ("num_heads", "attn_dim")
    # The attention whose fused path (``scaled_dot_product_attention``) would scale its logits by √(cut head width)
    # where the masked network used the full one: the cut turns that path off (``fused_attn = False``), so the
    # attention's ``scale``, fixed at construction, applies (BEiT's, EVA's; ``timm_attention_classes``).
    unfused_by_cut: str | None = None
    # The attention (EVA's under a rope) whose logits' scale the cut folds into its q rows instead: its fused path
    # divides by √(cut head width), so its q rows (and ``q_bias``) are multiplied by √(cut / full width) and its
    # ``scale`` set to the cut width's, and both paths compute the masked network's logits (``compaction.rope``)
    scaled_by_cut: str | None = None
    # The rotary position embedding rotating its q and k positions (``RopeFrequencies``): they are cut by whole
    # frequencies, the same in every head and in every attention reading the table
    rope: RopeFrequencies | None = field(default=None, repr=False, compare=False)
    tied_to: ChannelSpace | None = field(default=None, repr=False, compare=False)
    tied: list[ChannelSpace] = field(default_factory=list, repr=False, compare=False)
    multiple: int = 1

    @property
    def name(self) -> str:
        """The first producer's name: the space's name in logs and errors."""
        return self.producers[0].name

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.producers]

    @property
    def prunable(self) -> bool:
        return not self.refusals

    @property
    def head_rows(self) -> bool:
        """An attention's q, k, v rows, cut by head position: several heads, or a single one tied to the stream
        (PVT-v2's and Twins' first stage)."""
        return self.heads > 1 or self.tied_to is not None

    @property
    def head_unit(self) -> int:
        """Channels pruned together at least: a whole head's q, k and v rows (``whole_heads``), else 1."""
        return self.width // self.heads if self.whole_heads else 1

    @property
    def grouped(self) -> bool:
        """Pruned as a group of several producers (coupled, or carried through a depthwise conv)."""
        return len(self.producers) > 1

    def producers_as_points(self, at: tuple[int, ...] = (), per_channel: int = 1) -> list[ChannelPoint]:
        """Its producers' rows and their norms' entries as channel points of a space it joins (read at ``at``,
        ``per_channel`` entries per channel): what a space embedded or expanded into another leaves there."""
        return [point for layer in self.producers for point in rows_as_points(layer, at=at, per_channel=per_channel)]

    def refuse(self, reason: str, first: bool = False) -> None:
        """Add ``reason`` once; ``first``: as the first, the cause the others follow from (an opaque leaf)."""
        if first and reason in self.refusals:
            self.refusals.remove(reason)
        if reason not in self.refusals:
            self.refusals.insert(0 if first else len(self.refusals), reason)


def rows_as_points(layer: PrunableLayer, offset: int = 0, at: tuple[int, ...] = (), per_channel: int = 1
                   ) -> list[ChannelPoint]:  # fmt: skip
    """A layer's rows and its norm's entries as channel points of a space (from ``offset``, or at ``at``): a layer
    whose rows write several spaces (an attention's q, k and v rows in one conv), or a space joining another."""
    return [ChannelPoint(name, module, offset, layer.channel_shape, at, per_channel)
            for name, module in ((layer.name, layer.producer), (layer.norm_name, layer.norm))
            if name is not None and module is not None]  # fmt: skip


@dataclass
class ChannelGraph:
    """Every channel space of a model, in the order their first producers run."""

    spaces: list[ChannelSpace]

    @property
    def layers(self) -> list[PrunableLayer]:
        return [layer for space in self.spaces for layer in space.producers]

    @property
    def prunable(self) -> list[ChannelSpace]:
        return [space for space in self.spaces if space.prunable]
