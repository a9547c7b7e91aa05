"""The channel graph: traced once, read by selection, every strategy, the telemetry and compaction.

A model is traced with ``torch.fx`` into **channel spaces**. A space is a set of channels that share
an index everywhere they flow; cutting channel ``c`` of a space removes it from every tensor that
carries it. For each space the graph knows

- its **producers** (``PrunableLayer``): the weights that write channel ``c`` — a conv's kernel row
  ``weight[c]`` (and ``bias[c]``), a linear layer's output feature ``c``, a depthwise conv reading the
  space, which carries channel ``c`` to its own channel ``c`` and owns row ``c`` — each with its
  **norm** (the BatchNorm, or LayerNorm over the channels, applied directly to its output) and its
  **channel point**, where an activation mask removes the channel for good: the norm's output when
  there is one (after β: an all-zero input channel leaves BatchNorm as ``γ·(0 − 0)/√(0 + ε) + β = β``),
  else the producer's;
- its **consumers**: the weights that read it — a dense conv's input slice ``weight[:, c]``, a linear
  layer's input feature ``c``, or after a flatten its feature block ``c·k … (c+1)·k − 1`` — at an
  offset when the space reaches them through ``torch.cat`` along channels;
- its **points** (``ChannelPoint``): the norms that read it among other channels — a BatchNorm after a
  concatenation (DenseNet's pre-activation ``norm1``) or an addition, a LayerNorm over a residual stream
  (ConvNeXt's) — each writes β into the space's channels again, so the space is masked there too, at its
  offset, and cut from the norm's entries. A **LayerNorm over the channels** (``LAYER_NORMS``: ``nn.LayerNorm``
  over the last dim of a channels-last tensor, torchvision's ``LayerNorm2d`` over dim 1, exact types) also
  mixes the channels: its mean and variance count every channel it reads, so masking its input is not
  enough for the masked network to equal the cut one, whose LayerNorm counts the kept channels only. The
  ``activation`` strategy therefore recomputes it over the kept channels (``strategies.mask_layer_norm``)
  wherever it is a channel point;
- its **scales** (``ChannelScale``): per-channel parameters read outside their module (``get_attr``) and
  multiplied into it — ConvNeXt's ``layer_scale``, (C, 1, 1) — which keep a zero channel at zero and are cut
  with the space's channels; a parameter of any other shape is a tensor outside the graph, and refused;
- its **groups**: written or read by a grouped conv (ResNeXt, RegNet), a space is cut at the same
  positions in each of the conv's groups, scored by the criterion summed over the groups, so the
  conv keeps its group count and every group keeps an equal width;
- whether it is **coupled**: several producers' outputs meet in a residual addition or an elementwise
  product (a squeeze-and-excitation scale times its input), so the space is pruned as a group: masked
  at every producer's channel point (a sum or product of zeros is zero) and cut from every member;
- its **routes**, where it is **reordered** on its way: a channel shuffle (ShuffleNet's ``view`` to
  (N, groups, C/groups, H, W), ``transpose``, ``view`` back) or a ``chunk``/``split`` of the channels moves
  each channel to a position of its own, so a traced value may carry its channels position by position
  (``_Value.layout``) and each reader records where each channel of a space reaches it (``Consumer.at``,
  ``ChannelPoint.at``). A reshape is followed on a **probe**: a small tensor of channel indices (distinct
  primes for the other dims) goes through the same ``view``/``transpose``/``permute`` ops, with sizes read from
  ``x.size()`` as the probe has them; where every index along dim 1 or the last dim holds one channel again, the
  channels are readable again, reordered, and anything else reading a reshape mid-way refuses the space. A
  depthwise conv reading several spaces (a shuffled stream, a concatenation) carries each channel at its
  position: a ``ChannelPoint`` of each, its rows cut with the channels. A reordered space's **route** of a
  channel is the set of modules that read it (``channel_routes``): a cut that keeps the network's own shuffles
  and splits hands a cut network's channels to readers by position at the cut widths, so it places each kept
  channel on a slot of the same route (``compaction.cut``), and the criteria keep no more channels on a route
  than the cut network has slots there (``route_slots``, traced at those widths);
- its **heads**, where it is a Swin attention's q, k and v rows: torchvision's ``ShiftedWindowAttention`` (exact
  type) is kept whole, a leaf; its ``qkv`` reads the residual stream (a consumer) and writes the q, k, v rows of
  every head, a space of its own whose ``proj`` reads the value rows; ``proj`` writes the attention's output, a
  producer of the stream. Both are masked at the attention's output, the only place their channels exist
  outside it. The attention takes its head width from its input's width, so the heads' space is **tied** to the
  stream (``tied_to``): pruned with it or not at all, as many positions per head as the stream keeps per head
  (the stream is pruned in multiples of the heads, ``multiple``), the same from q and k. ``_patch_merging_pad``
  (Swin's patch merging) places the stream 4 times side by side. MaxViT's ``PartitionAttentionLayer`` (exactly as
  torchvision builds it) is a leaf too: the stream it reads is written again by its attention's ``merge`` and its
  MLP's second layer (residuals, so coupled), read by ``to_qkv`` and the MLP's first layer, normalised by its two
  LayerNorms; ``to_qkv``'s rows are a heads space tied to the stream, whose head width is the attention's own
  ``head_dim`` (``head_width_of``: the cut sets it; its scale, fixed at construction, stays). A flatten after an
  adaptive pooling to 1 × 1 is (N, C), not channel-major: a LayerNorm there (MaxViT's classifier) is a point;
- why it is **not prunable**, if it is not: an op the graph does not understand (its name goes to the
  log, once), a reshuffle by position it cannot follow (slicing, a split of unknown sizes), a grouped conv
  reading a concatenation, a norm across channels other than the known LayerNorms (GroupNorm, a LayerNorm
  subclass, a LayerNorm over more than the channels), channels read along another dim than theirs, a parameter tied
  to another module's or read outside its module (``F.conv2d(x, self.conv.weight)``), an activation
  with f(0) ≠ 0 between a channel point and a reader, the network's output. Nothing is guessed: a
  model ``torch.fx`` cannot trace has no prunable space.

Each traced value knows where its channels are: at dim 1 (a conv's output, and what a conv reads) or at
the last dim (a linear layer's output, and what a linear layer reads, unless flattened channel-major). A
``permute`` (``torch.permute``, ``Tensor.permute``, torchvision's ``Permute``) moves them; one that moves them
anywhere else, a pooling or reduction of channels-last values, an addition of values with their channels at
different dims, is refused. ConvNeXt is read this way: each stage's residual stream (the stem or
downsampling conv, every depthwise conv, every block's second linear layer, the LayerNorms, the layer scales)
is one coupled space, and each block's hidden width another.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.maxvit import PartitionAttentionLayer, RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, _patch_merging_pad
from torchvision.ops import StochasticDepth, stochastic_depth

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

# Ops that keep channel c in channel c and a zero channel at zero.
ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, StochasticDepth,
)  # fmt: skip
# Channel-preserving, but f(0) ≠ 0: a masked channel comes back to life (fine only inside a product).
REVIVING_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
F = torch.nn.functional
ZERO_PRESERVING_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu, F.hardswish, F.mish, torch.tanh, F.dropout,
    stochastic_depth,  # drops whole samples (or rows): each kept one is scaled, every channel alike
}  # fmt: skip
REVIVING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
POOLING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool2d}  # fmt: skip
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
REVIVING_METHODS = {"sigmoid"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}
UNKNOWN_OP = object()  # what a visit_* reader returns for an op it does not understand
NORMS_ACROSS_CHANNELS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
)  # fmt: skip
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
# LayerNorms over the channels, exact type → the dim they normalise: ``nn.LayerNorm`` the last (channels-last
# input), torchvision's ``LayerNorm2d`` dim 1. A subclass may compute something else: it stays refused.
LAYER_NORMS: dict[type[nn.Module], int] = {nn.LayerNorm: -1, LayerNorm2d: 1}
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
PERMUTE_FUNCTIONS = {torch.permute}


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

    @property
    def width(self) -> int:
        return norm_width(self.module)

    def channels(self, channels: torch.Tensor) -> torch.Tensor:
        """The norm's entries that carry the space's ``channels`` (those it reads)."""
        return _placed(self.at, channels) if self.at else channels + self.offset

    def placed(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the space's channels this point reads, their entries) for a space of ``width`` channels."""
        channels = torch.arange(width)
        if not self.at:
            return channels, channels + self.offset
        entries = torch.tensor(self.at)
        return channels[entries >= 0], entries[entries >= 0]


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

    def channels(self, channels: torch.Tensor) -> torch.Tensor:
        """The parameter's entries along ``dim`` that carry the space's ``channels``."""
        return channels + self.offset


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
    # A producer never called as a module (a Swin attention's ``qkv`` and ``proj``, whose weights the attention
    # reads itself): the module whose output completes its channels, the attention (``is_window_attention``).
    unit_name: str | None = None
    unit: nn.Module | None = field(default=None, repr=False)

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
        """An attention's ``qkv``: its channels live inside the attention, whose output is another space's."""
        return self.unit is not None and self.space is not None and self.space.heads > 1

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
class ChannelSpace:
    """Channels that share an index from their producers to their consumers; see the module docstring."""

    width: int
    producers: list[PrunableLayer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    coupled: bool = False
    refusals: list[str] = field(default_factory=list)
    points: list[ChannelPoint] = field(default_factory=list)  # norms reading it among other channels
    scales: list[ChannelScale] = field(default_factory=list)  # per-channel parameters multiplied into it
    # Written or read by a grouped conv: cut at the same positions in each of ``groups`` equal blocks, so
    # every group keeps its width and a reader's columns are the same for all its groups.
    groups: int = 1
    # Reordered on its way (a channel shuffle, a ``chunk``): its channels by **route** (the names of the modules
    # that read them). A cut that keeps the network's shuffles has, at a smaller width, its own number of slots on
    # each route (``route_slots``, by pruned share), so the criteria keep at most that many channels of each
    # route (``Criterion.select``). Empty: every channel goes the same way.
    routes: dict[tuple[str, ...], tuple[int, ...]] = field(default_factory=dict)
    route_slots: Callable[[float], dict[tuple[str, ...], int]] | None = field(default=None, repr=False, compare=False)
    # An attention's q, k and v rows (``qkv``, 3 × heads × head width): each head keeps as many query/key positions
    # (cut from q and k alike) as value positions, and as many as every other head: ``heads``. Its head width
    # follows its input's width, so it is pruned with that space (``tied_to``), and that one in multiples of
    # ``multiple`` channels (the heads of every attention reading it), kept / heads per head.
    heads: int = 1
    head_width_of: str | None = None  # the attention whose ``head_dim`` the cut sets (MaxViT's; Swin's follows)
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
    def grouped(self) -> bool:
        """Pruned as a group of several producers (coupled, or carried through a depthwise conv)."""
        return len(self.producers) > 1

    def refuse(self, reason: str) -> None:
        if reason not in self.refusals:
            self.refusals.append(reason)


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


def channel_routes(space: ChannelSpace) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``space``'s channels grouped by route, the names of the modules that read them, where it reaches a reader
    reordered (a channel shuffle, a ``chunk``); {} where every channel goes the same way."""
    readers = [*space.consumers, *space.points]
    if space.heads > 1 or not any(reader.at for reader in readers):  # an attention's value rows: not reordered
        return {}
    routes: dict[tuple[str, ...], list[int]] = {}
    for channel in range(space.width):
        route = tuple(sorted(r.name for r in readers if not r.at or r.at[channel] >= 0))
        routes.setdefault(route, []).append(channel)
    return {route: tuple(channels) for route, channels in routes.items()}


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose output channel c reads input channel c only (groups = in = out channels)."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d))
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def is_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin attention (exact type: V2's cosine attention is another function)."""
    return type(module) is ShiftedWindowAttention


def is_partition_attention(module: nn.Module) -> bool:
    """torchvision's MaxViT window or grid attention layer, exactly as torchvision builds it: partition, LayerNorm →
    relative-position attention → dropout, LayerNorm → MLP, each with its residual, departition."""
    if type(module) is not PartitionAttentionLayer:
        return False
    attention, mlp = list(module.attn_layer), list(module.mlp_layer)
    return [type(m) for m in attention] == [nn.LayerNorm, RelativePositionalMultiHeadAttention, nn.Dropout] and [
        type(m) for m in mlp
    ] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear, nn.Dropout]


def is_layer_norm(module: nn.Module) -> bool:
    """A LayerNorm the graph knows to normalise over channels (exact types: ``LAYER_NORMS``)."""
    return type(module) in LAYER_NORMS


def norm_width(module: nn.Module) -> int:
    """The channels a BatchNorm or a LayerNorm over channels normalises (a depthwise conv's, where it carries
    several spaces as a ``ChannelPoint``)."""
    if is_layer_norm(module):
        return module.normalized_shape[0]
    return module.out_channels if is_depthwise(module) else module.num_features


def _output_ndim(module: nn.Module) -> int | None:
    """Dimensions of a producer's output: (N, C, L) after a Conv1d, (N, C, H, W) after a Conv2d; a linear
    layer's input may have any rank."""
    return {nn.Conv1d: 3, nn.Conv2d: 4}.get(type(module))


def _shared_parameters(model: nn.Module, graph: torch.fx.Graph) -> dict[str, str]:
    """Modules whose parameters are not theirs alone → why: tied to another module's (``b.weight = a.weight``)
    or read outside the module (``F.conv2d(x, self.conv.weight)``, a ``get_attr`` in the graph). Cutting
    such a module's rows or columns would leave the other reader with the old shape, or untie the two.
    Each is said once in the log."""
    owners: dict[int, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(model.get_parameter(name)), []).append(name)
    modules = dict(model.named_modules())
    shared: dict[str, str] = {}
    for names in owners.values():
        for name in names[1:]:
            shared.setdefault(name.rpartition(".")[0], f"{name} is {names[0]} (tied parameters)")
            shared.setdefault(names[0].rpartition(".")[0], f"{names[0]} is tied to {name}")
    for node in graph.nodes:
        if node.op == "get_attr":
            readers = ", ".join(_describe(user, modules) for user in node.users)
            for name in owners.get(id(_attribute(model, str(node.target))), [str(node.target)]):
                shared.setdefault(name.rpartition(".")[0], f"{name} is also read by {readers}")
    for module_name, reason in shared.items():
        if isinstance(modules.get(module_name), (*PRODUCER_TYPES, *NORM_TYPES, *LAYER_NORMS)):
            log.info("channel graph: %s; its channels are not prunable", reason)
    return shared


def _attribute(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


# -- tracing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Value:
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
class _Parts:
    """What ``chunk``/``split`` along the channels returns: one ``_Value`` per part, taken by ``getitem``."""

    parts: tuple[_Value | None, ...]


# Ops a reshape probe goes through: they move elements without computing on them.
RESHAPE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "swapaxes"}
RESHAPE_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.swapaxes}
# Integer arithmetic on shapes, evaluated where its inputs are known (a shuffle's ``C // groups``).
SHAPE_ARITHMETIC = {operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.neg}
# The sizes a probe gives the dims other than the channels: distinct primes, so a reshape that mixed a spatial or
# the batch dim into the channels could not come back to the probe's shape by chance.
PROBE_SIZES = (2, 3, 5, 7, 11)


def _one_whole_space(value: _Value | None) -> bool:
    """Whether ``value`` carries one space, whole, in its own order (what an attention's head width can follow)."""
    return value is not None and value.layout is None and len(value.segments) == 1 and value.segments[0][1] == 0


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {node.target}"
    if node.op == "call_method":
        return f".{node.target}() at {node.name}"
    return f"{getattr(node.target, '__name__', node.target)}() at {node.name}"


class _Tracer:
    """One forward walk over an fx graph, building spaces with a union-find over their ids."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, widths: Mapping[str, int] | None = None) -> None:
        # ``widths``: producers traced as if they had these widths (``route_slots``: how a cut network would route
        # its channels), their readers taken at whatever width reaches them
        self.widths = widths
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.spaces: list[ChannelSpace] = []
        self.parent: list[int] = []
        self.values: dict[torch.fx.Node, _Value | None] = {}
        self.writer_of: dict[torch.fx.Node, PrunableLayer] = {}
        self.not_understood: dict[str, set[int]] = {}
        self.concrete: dict[torch.fx.Node, Any] = {}  # shapes and shape arithmetic a reshape probe needs
        self.ties: list[tuple[int, int, str]] = []  # (an attention's q/k/v space, the space it reads, the attention)
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
        self.shared = _shared_parameters(model, graph)
        self.model = model
        self.attribute_reads: dict[str, int] = {}  # get_attr target → how many ops read it
        for node in graph.nodes:
            if node.op == "get_attr":
                self.attribute_reads[str(node.target)] = self.attribute_reads.get(str(node.target), 0) + len(node.users)

    def width(self, layer: PrunableLayer) -> int:
        return layer.num_channels if self.widths is None else self.widths.get(layer.name, layer.num_channels)

    def fits(self, value_width: int | None, module_width: int) -> bool:
        """Whether a reader of ``module_width`` channels reads a value of ``value_width`` (any, at ``widths``)."""
        return value_width == module_width or (self.widths is not None and value_width is not None)

    def reused(self, name: str) -> str | None:
        """Why module ``name``'s tensors are not its own to cut (called twice, a parameter used elsewhere)."""
        if self.calls.get(name, 0) > 1:
            return f"{name} is called {self.calls[name]} times"
        return self.shared.get(name)

    # union-find
    def root(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def space(self, index: int) -> ChannelSpace:
        return self.spaces[self.root(index)]

    def new_space(self, layer: PrunableLayer) -> int:
        self.spaces.append(ChannelSpace(self.width(layer), [layer]))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.root(a), self.root(b)
        if a == b:
            return a
        first, second = (a, b) if a < b else (b, a)
        kept, merged = self.spaces[first], self.spaces[second]
        kept.producers += merged.producers
        kept.consumers += merged.consumers
        kept.points += merged.points
        kept.scales += merged.scales
        kept.groups = self.joined_groups(kept, merged.groups, where)
        kept.refusals += [reason for reason in merged.refusals if reason not in kept.refusals]
        kept.coupled = True
        if kept.width != merged.width:
            kept.refuse(f"{where} joins {kept.width} with {merged.width} channels")
        self.parent[second] = first
        return first

    @staticmethod
    def joined_groups(space: ChannelSpace, groups: int, where: str) -> int:
        if groups == 1 or space.groups in (1, groups):
            return max(space.groups, groups)
        space.refuse(f"{where} joins a space cut in {space.groups} groups with one cut in {groups}")
        return space.groups

    def refuse(self, value: _Value | _Parts | None, reason: str) -> None:
        for part in value.parts if isinstance(value, _Parts) else (value,):
            for index, _ in part.segments if part is not None else ():
                self.space(index).refuse(reason)

    def refuse_unknown(self, node: torch.fx.Node, values: Iterable[_Value | _Parts | None]) -> None:
        description = _describe(node, self.modules)
        for value in values:
            for part in value.parts if isinstance(value, _Parts) else (value,):
                if part is not None:
                    self.refuse(part, f"reaches {description}, whose effect on channels is not understood")
                    self.not_understood.setdefault(description, set()).update(i for i, _ in part.segments)

    def input_values(self, node: torch.fx.Node) -> list[_Value | None]:
        nodes: list[torch.fx.Node] = []
        torch.fx.map_arg((node.args, node.kwargs), lambda n: nodes.append(n))
        return [self.values.get(n) for n in nodes]

    def first(self, node: torch.fx.Node) -> _Value | None:
        arg = node.args[0] if node.args else None
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    # the walk
    def run(self) -> ChannelGraph:
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)
        for description, indices in self.not_understood.items():
            names = sorted({self.space(i).name for i in indices})
            log.info("channel graph: %s is not understood; not prunable: %s", description, ", ".join(names))
        spaces = [space for index, space in enumerate(self.spaces) if self.root(index) == index]
        for space in spaces:
            space.consumers = list(dict.fromkeys(space.consumers))
            space.routes = channel_routes(space)
            for layer in space.producers:
                layer.space = space
        self.tie(spaces)
        graph = ChannelGraph(spaces)
        if self.widths is None and any(space.routes for space in spaces):
            slots = _RouteSlots(self.model, graph)
            for space in spaces:
                if space.routes:
                    space.route_slots = functools.partial(slots.of, space.name)
        return graph

    def tie(self, spaces: list[ChannelSpace]) -> None:
        """Tie each attention's q/k/v space to the space it reads: pruned together or not at all."""
        for inner, read, _ in self.ties:
            attention, anchor = self.space(inner), self.space(read)
            attention.tied_to = anchor
            anchor.tied.append(attention)
            anchor.multiple = math.lcm(anchor.multiple, attention.heads)
        for _ in range(2):  # a refusal on either side refuses the other
            for inner, read, name in self.ties:
                attention, anchor = self.space(inner), self.space(read)
                if attention.prunable and not anchor.prunable:
                    attention.refuse(f"attention {name}'s head width follows {anchor.name}, which is not prunable")
                if anchor.prunable and not attention.prunable:
                    anchor.refuse(f"attention {name}'s head width follows it, and its q, k, v rows are not prunable")
                if anchor.width % anchor.multiple:
                    anchor.refuse(f"its {anchor.width} channels are not a multiple of attention {name}'s heads")

    def visit(self, node: torch.fx.Node) -> _Value | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for value in self.input_values(node):
                self.refuse(value, "reaches the network's output, whose shape would change")
            return None
        if self.shape_arithmetic(node):
            return None
        value = self.first(node)
        values = self.input_values(node)
        if isinstance(value, _Parts) and node.target is operator.getitem and isinstance(node.args[1], int):
            return value.parts[node.args[1]]
        probing = value is not None and not isinstance(value, _Parts) and value.probe is not None
        if probing and self.reshaping(node):
            return self.probed(node, value)
        if probing and (node.target == "size" or (node.target is getattr and node.args[1:2] == ("shape",))):
            self.record_shape(node, value, self.argument(node, 1, "dim", None) if node.target == "size" else None)
            return None
        if any(isinstance(v, _Parts) or (v is not None and v.probe is not None) for v in values):
            self.refuse_unknown(node, values)  # a split's tuple read whole, a reshape mid-way read by a computation
            return None
        reader = {"call_module": self.visit_module, "call_function": self.visit_function,
                  "call_method": self.visit_method}.get(node.op)  # fmt: skip
        result = UNKNOWN_OP if reader is None else reader(node, value)
        if result is not UNKNOWN_OP:
            return result
        if value is not None and self.reshaping(node):
            return self.probed(node, value)
        if node.target in SPLIT_FUNCTIONS or (node.op == "call_method" and node.target in SPLIT_METHODS):
            for split in values:
                self.refuse(split, f"{_describe(node, self.modules)} splits them by position")
            return None
        if any(v is not None for v in values):
            self.refuse_unknown(node, values)
        return None

    def visit_module(self, node: torch.fx.Node, value: _Value | None) -> _Value | object | None:
        """What a module call does to its input's channels; ``UNKNOWN_OP`` if the module is not understood."""
        module = self.modules[str(node.target)]
        if isinstance(module, PRODUCER_TYPES):
            return self.producer(node, module, value)
        if is_window_attention(module):
            return self.attention(node, module, value)
        if is_partition_attention(module):
            return self.partition_attention(node, module, value)
        if isinstance(module, NORM_TYPES) or is_layer_norm(module):
            return self.norm(node, module, value)
        if isinstance(module, NORMS_ACROSS_CHANNELS):
            self.refuse(value, f"{type(module).__name__} {node.target} normalises across channels (not supported)")
            return None
        if isinstance(module, ZERO_PRESERVING_MODULES):
            return value
        if isinstance(module, REVIVING_MODULES):
            return self.revived(value, node)
        if isinstance(module, POOLING_MODULES):
            return self.pooled(node, value)
        if isinstance(module, nn.Flatten):
            return self.flattened(node, value, module.start_dim, module.end_dim)
        return UNKNOWN_OP

    def visit_function(self, node: torch.fx.Node, value: _Value | None) -> _Value | object | None:
        """What a function call does to its inputs' channels; ``UNKNOWN_OP`` if the function is not understood."""
        target = node.target
        if target in ZERO_PRESERVING_FUNCTIONS:
            return value
        if target in REVIVING_FUNCTIONS:
            return self.revived(value, node)
        if target in POOLING_FUNCTIONS:
            return self.pooled(node, value)
        if target is torch.flatten:
            return self.flattened(node, value, self.argument(node, 1, "start_dim", 0),
                                  self.argument(node, 2, "end_dim", -1))  # fmt: skip
        if target in ADD_FUNCTIONS or target in MUL_FUNCTIONS:
            return self.elementwise(node, target in MUL_FUNCTIONS)
        if target is torch.cat:
            return self.cat(node)
        if target in PERMUTE_FUNCTIONS:
            return self.permuted(node, value, self.argument(node, 1, "dims", None))
        if target is operator.getitem and value is None:
            return None
        if target is getattr and node.args[1:2] in (("shape",), ("ndim",), ("dtype",), ("device",)):
            if node.args[1] == "shape":
                self.record_shape(node, value, None)
            return None  # a tensor's metadata carries no channel; what is built from it is judged where used
        if target in (torch.chunk, torch.split):
            return self.split(node, value)
        if target is _patch_merging_pad:  # Swin's patch merging: the 4 pixels of each 2×2 patch side by side
            if value is None or value.flattened or not value.channels_last or self.layout_of(value) is None:
                return UNKNOWN_OP
            return self.with_layout(value, self.layout_of(value) * 4)
        return UNKNOWN_OP

    def visit_method(self, node: torch.fx.Node, value: _Value | None) -> _Value | object | None:
        """What a tensor method does to its tensor's channels; ``UNKNOWN_OP`` if the method is not understood."""
        method = str(node.target)
        if method in ZERO_PRESERVING_METHODS:
            return value
        if method in REVIVING_METHODS:
            return self.revived(value, node)
        if method == "flatten":
            return self.flattened(node, value, self.argument(node, 1, "start_dim", 0),
                                  self.argument(node, 2, "end_dim", -1))  # fmt: skip
        if method in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
            return self.flattened(node, value, 1, -1)  # x.view(x.size(0), -1)
        if method in ("mean", "amax") and self.spatial_reduction(node, value):
            return self.flattened(node, value, 1, -1) if not self.argument(node, 2, "keepdim", False) else value
        if method == "permute":
            dims = node.args[1] if len(node.args) == 2 else node.args[1:] or node.kwargs.get("dims")
            return self.permuted(node, value, dims)
        if method == "size":
            self.record_shape(node, value, self.argument(node, 1, "dim", None))
            return None  # a shape carries no channel; what is built from it is judged where it is used
        if method in ("chunk", "split"):
            return self.split(node, value)
        return UNKNOWN_OP

    @staticmethod
    def argument(node: torch.fx.Node, position: int, keyword: str, default: Any) -> Any:
        if keyword in node.kwargs:
            return node.kwargs[keyword]
        return node.args[position] if len(node.args) > position else default

    def spatial_reduction(self, node: torch.fx.Node, value: _Value | None) -> bool:
        """Whether the reduction takes every spatial dim (all after the channels), leaving (N, C)."""
        dims = self.argument(node, 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else dims
        if value is None or value.ndim is None or value.channels_last or not isinstance(dims, (list, tuple)):
            return False
        return sorted(d % value.ndim for d in dims if isinstance(d, int)) == list(range(2, value.ndim))

    def revived(self, value: _Value | None, node: torch.fx.Node) -> _Value | None:
        return None if value is None else replace(value, revived_by=_describe(node, self.modules))

    def pooled(self, node: torch.fx.Node, value: _Value | None) -> _Value | None:
        if value is not None and (value.flattened or value.channels_last):  # it would pool across channels
            self.refuse_unknown(node, [value])
            return None
        if value is not None and self.pools_to_one(node):
            return replace(value, spatial_one=True)
        return value

    def pools_to_one(self, node: torch.fx.Node) -> bool:
        """An adaptive pooling to 1 × 1: what a flatten then gives is (N, C), the channels at dim 1 and last."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            size = getattr(module, "output_size", None) if "Adaptive" in type(module).__name__ else None
        else:
            adaptive = node.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
            size = self.argument(node, 1, "output_size", None) if adaptive else None
        return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))

    def flattened(self, node: torch.fx.Node, value: _Value | None, start: Any, end: Any) -> _Value | None:
        """A flatten of the spatial dims only keeps every channel; one of the channels with every dim after
        them is channel-major (channel c's features are a block); anything else — a flatten that keeps a
        spatial dim after the channels, of a tensor of unknown rank — is refused."""
        if value is None:
            return None
        if isinstance(start, int) and start >= 2 and isinstance(end, int) and not value.flattened:
            # spatial dims only (``x.flatten(2)``): every channel keeps its index
            if end == -1 or value.ndim is None:
                return replace(value, ndim=start + 1 if end == -1 else None)
            return replace(value, ndim=value.ndim - (end % value.ndim - start))
        whole = start == 1 and (end == -1 or (value.ndim is not None and end == value.ndim - 1))
        if whole and value.spatial_one and not value.flattened and value.channels_at(1):
            return replace(value, ndim=2, spatial_one=False)  # (N, C): a linear layer or a LayerNorm reads dim 1
        if not whole or value.flattened or not value.channels_at(1) or value.layout is not None:
            self.refuse_unknown(node, [value])
            return None
        return replace(value, flattened=True, ndim=2)

    def permuted(self, node: torch.fx.Node, value: _Value | None, dims: Any) -> _Value | None:
        """A permute moves the channels: to dim 1 or to the last dim they stay readable (a conv reads dim 1, a
        linear layer the last); anywhere else, or of a flattened tensor or one of another rank, it is refused."""
        if value is None:
            return None
        ndim = len(dims) if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims) else 0
        order = [d % ndim for d in dims] if ndim else []
        where = ndim - 1 if value.channels_last else 1
        if ndim < 2 or value.flattened or value.ndim not in (None, ndim) or where not in order:
            self.refuse_unknown(node, [value])
            return None
        moved_to = order.index(where)
        if moved_to not in (1, ndim - 1):
            self.refuse(value, f"{_describe(node, self.modules)} moves them to dim {moved_to}: no reader there")
            return None
        return replace(value, ndim=ndim, channels_last=moved_to == ndim - 1 and ndim > 2)

    # reordered channels: splits, reshapes, shuffles
    def layout_of(self, value: _Value) -> tuple[tuple[int, int], ...] | None:
        """``value``'s channels position by position, (space id, channel); None where part of it is unknown."""
        if value.layout is not None:
            return value.layout
        if value.width is None or value.flattened:
            return None
        positions: list[tuple[int, int] | None] = [None] * value.width
        for index, offset in value.segments:
            for channel in range(self.space(index).width):
                positions[offset + channel] = (index, channel)
        return None if None in positions else tuple(positions)  # type: ignore[return-value]

    def with_layout(self, value: _Value, layout: Sequence[tuple[int, int]], **changes: Any) -> _Value:
        """``value`` carrying ``layout``: as segments where it is whole spaces in order, else position by position."""
        segments: list[tuple[int, int]] = []
        position = 0
        while position < len(layout):
            index, channel = layout[position]
            width = self.space(index).width
            run = tuple((index, c) for c in range(width))
            if channel != 0 or tuple(layout[position : position + width]) != run:
                break
            segments.append((index, position))
            position += width
        if position == len(layout):
            return replace(value, segments=tuple(segments), width=len(layout), layout=None, probe=None, **changes)
        spaces = tuple((index, -1) for index in dict.fromkeys(index for index, _ in layout))
        return replace(value, segments=spaces, width=len(layout), layout=tuple(layout), probe=None, **changes)

    def split(self, node: torch.fx.Node, value: _Value | None) -> _Parts | object | None:
        """``chunk``/``split`` along the channels: each part carries its positions of the layout."""
        if value is None:
            return None
        sections = self.argument(node, 1, "split_size_or_sections" if "split" in str(node.target) else "chunks", None)
        if node.target in ("split", torch.split) and "split_size" in node.kwargs:
            sections = node.kwargs["split_size"]
        dim = self.argument(node, 2, "dim", 0)
        layout = self.layout_of(value)
        if layout is None or not isinstance(dim, int) or not value.channels_at(dim):
            return UNKNOWN_OP
        width = len(layout)
        if node.target in ("chunk", torch.chunk):
            if not isinstance(sections, int) or sections < 1:
                return UNKNOWN_OP
            size = -(-width // sections)
            sizes = [min(size, width - start) for start in range(0, width, size)]
        elif isinstance(sections, int) and sections > 0:
            sizes = [min(sections, width - start) for start in range(0, width, sections)]
        elif (
            isinstance(sections, (list, tuple)) and all(isinstance(n, int) for n in sections) and sum(sections) == width
        ):
            sizes = list(sections)
        else:
            return UNKNOWN_OP
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return _Parts(tuple(self.with_layout(value, layout[a : a + n]) for a, n in zip(starts, sizes, strict=True)))

    def probe_shape(self, value: _Value) -> tuple[int, ...] | None:
        """The shape a probe of ``value`` has: its channels at their dim, ``PROBE_SIZES`` elsewhere."""
        if value.ndim is None or value.width is None or value.flattened or value.ndim > len(PROBE_SIZES) + 1:
            return None
        where = value.ndim - 1 if value.channels_last else 1
        others = iter(PROBE_SIZES)
        return tuple(value.width if d == where else next(others) for d in range(value.ndim))

    def record_shape(self, node: torch.fx.Node, value: _Value | None, dim: Any) -> None:
        """``x.size()``/``x.shape`` of a channel value as its probe has it: what a reshape's arguments come from."""
        if value is None or isinstance(value, _Parts):
            return
        shape = tuple(value.probe.shape) if value.probe is not None else self.probe_shape(value)
        if shape is not None:
            self.concrete[node] = shape if dim is None else shape[dim] if isinstance(dim, int) else None

    def shape_arithmetic(self, node: torch.fx.Node) -> bool:
        """Evaluate integer arithmetic on recorded shapes (``C // groups``); True if ``node`` was such a step."""
        if node.op != "call_function" or node.target not in SHAPE_ARITHMETIC:
            return False
        args, known = self.resolved(node.args)
        first = node.args[0] if node.args else None
        if not known or not isinstance(first, torch.fx.Node) or first not in self.concrete:
            return False
        try:
            self.concrete[node] = node.target(*args)
        except (TypeError, IndexError, ZeroDivisionError):
            return False
        return True

    def resolved(self, arguments: Any) -> tuple[Any, bool]:
        """``arguments`` with each node replaced by its recorded shape or shape arithmetic; False if one is not."""
        missing: list[torch.fx.Node] = []

        def resolve(node: torch.fx.Node) -> Any:
            if node not in self.concrete:
                missing.append(node)
            return self.concrete.get(node)

        return torch.fx.map_arg(arguments, resolve), not missing

    def reshaping(self, node: torch.fx.Node) -> bool:
        if node.op == "call_method":
            return str(node.target) in RESHAPE_METHODS
        return node.op == "call_function" and node.target in RESHAPE_FUNCTIONS

    def probed(self, node: torch.fx.Node, value: _Value) -> _Value | None:
        """A reshape of channels (a shuffle: view to (N, groups, C/groups, H, W), transpose, view back), followed
        on a probe: a tensor of channel indices with distinct primes for the other dims goes through the same ops.
        Where every index along dim 1 or the last dim holds one channel, and all channels appear, the channels are
        readable again, reordered; until then only another reshape may read the value."""
        layout = self.layout_of(value) if value.probe is None else value.layout
        shape = self.probe_shape(value) if value.probe is None else None
        if layout is None or (value.probe is None and shape is None):
            self.refuse_unknown(node, [value])
            return None
        if value.probe is None:
            where = value.ndim - 1 if value.channels_last else 1
            view = [1] * len(shape)
            view[where] = len(layout)
            probe = torch.arange(len(layout)).view(view).expand(shape).contiguous()
        else:
            probe = value.probe
        (args, kwargs), known = self.resolved((node.args[1:], node.kwargs))
        try:
            if not known:
                raise ValueError("arguments not known")
            if node.op == "call_method":
                result = getattr(probe, str(node.target))(*args, **kwargs)
            else:
                result = node.target(probe, *args, **kwargs)
        except (TypeError, ValueError, RuntimeError, IndexError):
            self.refuse_unknown(node, [value])
            return None
        for dim in (1, result.ndim - 1) if result.ndim >= 2 else ():
            rows = result.movedim(dim, 0).reshape(result.shape[dim], -1)
            order = rows[:, 0]
            one_channel_each = len(order) == len(layout) and bool((rows == order[:, None]).all())
            if one_channel_each and bool((order.sort().values == torch.arange(len(layout))).all()):
                moved = [layout[int(i)] for i in order]
                return self.with_layout(value, moved, ndim=result.ndim, channels_last=dim == result.ndim - 1 > 1)
        return replace(value, layout=layout, probe=result)

    # producers, norms and readers
    def producer(self, node: torch.fx.Node, module: nn.Module, value: _Value | None) -> _Value:
        name = str(node.target)
        layer = PrunableLayer(name, module)
        if is_depthwise(module):
            single = value is not None and len(value.segments) == 1 and self.fits(value.width, module.in_channels)
            single = single and not value.flattened and value.channels_at(1)
            if single and value.revived_by is None and not self.reused(name):
                ((index, _),) = value.segments
                self.space(index).producers.append(layer)  # it carries channel c to its own channel c
                self.writer_of[node] = layer
                return _Value(value.segments, value.width, ndim=_output_ndim(module))
            carried = self.carried(node, module, value)
            if carried is not None:
                return carried
            index = self.new_space(layer)
            self.spaces[index].refuse(f"depthwise conv {name} reads a tensor that is not one whole channel space")
            self.refuse(value, f"depthwise conv {name} reads them along with other channels")
            return _Value(((index, 0),), self.width(layer), ndim=_output_ndim(module))
        self.read(name, module, value)
        index = self.new_space(layer)
        if getattr(module, "groups", 1) > 1:
            self.spaces[index].groups = module.groups
        if self.reused(name):
            self.spaces[index].refuse(self.reused(name))
        self.writer_of[node] = layer
        if isinstance(module, nn.Linear):  # its features are the last dim of a tensor of its input's rank
            return _Value(((index, 0),), self.width(layer), ndim=value.ndim if value else None, channels_last=True)
        return _Value(((index, 0),), self.width(layer), ndim=_output_ndim(module))

    def attention(self, node: torch.fx.Node, module: ShiftedWindowAttention, value: _Value | None) -> _Value:
        """torchvision's Swin attention, a leaf: ``qkv`` reads its input (a consumer), writes the q, k and v rows
        of every head (a space of ``heads``, tied to the input's: the head width is the input's width / heads),
        ``proj`` reads the value rows and writes the output (a new space). Both are masked at the attention's
        output, the only place their channels exist outside it."""
        name = str(node.target)
        qkv = PrunableLayer(f"{name}.qkv", module.qkv, unit_name=name, unit=module)
        proj = PrunableLayer(f"{name}.proj", module.proj, unit_name=name, unit=module)
        self.read(qkv.name, module.qkv, value)
        inner = self.new_space(qkv)
        self.spaces[inner].heads = module.num_heads
        width = module.proj.in_features
        self.spaces[inner].consumers.append(Consumer(proj.name, "linear", at=(-1,) * (2 * width) + tuple(range(width))))
        if self.reused(name) or not _one_whole_space(value) or value.width != module.qkv.in_features:
            self.spaces[inner].refuse(f"attention {name}'s head width follows a tensor that is not one whole space")
        else:
            self.ties.append((inner, value.segments[0][0], name))
        output = self.new_space(proj)
        return _Value(((output, 0),), width, ndim=value.ndim if value else None, channels_last=True)

    def partition_attention(self, node: torch.fx.Node, module: PartitionAttentionLayer, value: _Value | None) -> Any:
        """torchvision's MaxViT window or grid attention layer, a leaf: it partitions its input (N, C, H, W) into
        windows, channels last, and adds an attention and an MLP to it, each after a LayerNorm over the channels,
        then puts the windows back. The stream it reads is written again by the attention's ``merge`` and the MLP's
        second layer (coupled, as residuals are), read by ``to_qkv`` and the MLP's first layer, normalised by both
        LayerNorms (channel points); ``to_qkv`` writes the q, k, v rows of every head, a space tied to the stream
        (``attention``), whose ``merge`` reads the value rows; the MLP's hidden width is a space of its own."""
        name = str(node.target)
        width = module.attn_layer[0].normalized_shape[0]
        usable = _one_whole_space(value) and value.width == width and not value.flattened and value.channels_at(1)
        if not usable or value.revived_by is not None or self.reused(name):
            self.refuse_unknown(node, [value])
            return None
        (stream, _), windows = value.segments[0], replace(value, channels_last=True, ndim=4)
        attention, mlp = module.attn_layer[1], module.mlp_layer
        for norm_name in (f"{name}.attn_layer.0", f"{name}.mlp_layer.0"):
            self.add_points(norm_name, self.modules[norm_name], windows, (width,))
        qkv = PrunableLayer(f"{name}.attn_layer.1.to_qkv", attention.to_qkv)
        self.read(qkv.name, attention.to_qkv, windows)
        inner = self.new_space(qkv)
        self.spaces[inner].heads = attention.n_heads
        self.spaces[inner].head_width_of = f"{name}.attn_layer.1"
        merge = f"{name}.attn_layer.1.merge"
        self.spaces[inner].consumers.append(Consumer(merge, "linear", at=(-1,) * (2 * width) + tuple(range(width))))
        self.ties.append((inner, stream, name))
        first = PrunableLayer(f"{name}.mlp_layer.1", mlp[1])
        self.read(first.name, mlp[1], windows)
        hidden = self.new_space(first)
        self.spaces[hidden].consumers.append(Consumer(f"{name}.mlp_layer.3", "linear"))
        for layer in (PrunableLayer(merge, attention.merge), PrunableLayer(f"{name}.mlp_layer.3", mlp[3])):
            stream = self.union(stream, self.new_space(layer), f"{name}'s residual")
        return _Value(((stream, 0),), width, ndim=value.ndim)

    def carried(self, node: torch.fx.Node, module: nn.Module, value: _Value | None) -> _Value | None:
        """A depthwise conv reading several spaces (a concatenation, a shuffled stream) carries each channel to its
        own channel: it is a ``ChannelPoint`` of each (its rows cut with the channels, its output masked, as it may
        add a bias), not a producer of a space of its own. None if it reads anything else."""
        name = str(node.target)
        if (
            value is None
            or not self.fits(value.width, module.in_channels)
            or value.flattened
            or not value.channels_at(1)
            or value.revived_by is not None
            or self.reused(name)
            or (value.layout is None and len(value.segments) < 2)
        ):
            return None
        ndim = _output_ndim(module)
        shape = (1, module.out_channels, *([1] * (ndim - 2)))
        self.add_points(name, module, value, shape)
        return replace(value, ndim=ndim)

    def add_points(self, name: str, module: nn.Module, value: _Value, shape: tuple[int, ...]) -> None:
        """``module`` (a norm, a depthwise conv) as a ``ChannelPoint`` of every space ``value`` carries."""
        if value.layout is None:
            for index, offset in value.segments:
                self.space(index).points.append(ChannelPoint(name, module, offset, shape))
            return
        for index, at in self.positions(value.layout).items():
            self.space(index).points.append(ChannelPoint(name, module, 0, shape, at=at))

    def positions(self, layout: tuple[tuple[int, int], ...]) -> dict[int, tuple[int, ...]]:
        """Space id → for each of its channels, where the layout places it (-1: not in it)."""
        at: dict[int, list[int]] = {}
        for position, (index, channel) in enumerate(layout):
            at.setdefault(index, [-1] * self.space(index).width)[channel] = position
        return {index: tuple(entries) for index, entries in at.items()}

    def read(self, name: str, module: nn.Module, value: _Value | None) -> None:
        """Record ``module`` as a consumer of every space in ``value``, or refuse those spaces."""
        if value is None:
            return
        reason = self.reused(name)
        if reason:
            self.refuse(value, f"their reader {reason if reason.startswith(name) else f'{name}: {reason}'}")
            return
        if value.revived_by is not None:
            self.refuse(value, f"{value.revived_by} turns a masked channel's 0 into f(0) ≠ 0 before {name} reads it")
            return
        if getattr(module, "groups", 1) > 1:
            whole = len(value.segments) == 1 and self.fits(value.width, module.in_channels) and not value.flattened
            if not whole or not value.channels_at(1):
                self.refuse(value, f"grouped conv {name} (groups={module.groups}) reads them with other channels")
                return
            ((index, _),) = value.segments
            space = self.space(index)
            space.groups = self.joined_groups(space, module.groups, f"grouped conv {name}")
            space.consumers.append(Consumer(name, "grouped", block=module.in_channels // module.groups))
            return
        linear = isinstance(module, nn.Linear)
        width = module.in_features if linear else module.in_channels
        per_channel = 1
        if value.layout is not None:
            if value.flattened or not (value.channels_at(-1) if linear else value.channels_at(1)):
                self.refuse(value, f"{name} reads them along another dimension than their channels")
                return
            for index, at in self.positions(value.layout).items():
                self.space(index).consumers.append(Consumer(name, "linear" if linear else "conv", at=at))
            return
        if value.flattened:
            if not linear or value.width is None or width % value.width:
                self.refuse(value, f"{name} reads them flattened in a layout the graph does not follow")
                return
            per_channel = width // value.width
        if not (value.read_by_linear if linear else value.channels_at(1) and not value.flattened):
            self.refuse(value, f"{name} reads them along another dimension than their channels")
            return
        for index, offset in value.segments:
            self.space(index).consumers.append(Consumer(name, "linear" if linear else "conv", per_channel, offset))

    def norm(self, node: torch.fx.Node, module: nn.Module, value: _Value | None) -> _Value | None:
        """A BatchNorm (over dim 1) or a LayerNorm over the channels (``LAYER_NORMS``). Directly after its
        producer it is the producer's norm, its channel point; reading a space among other channels (after a
        concatenation or an addition) it is an extra ``ChannelPoint`` of each space it reads."""
        name = str(node.target)
        width = norm_width(module)
        dim = LAYER_NORMS.get(type(module), 1)
        source = node.args[0] if node.args else None
        writer = self.writer_of.get(source) if isinstance(source, torch.fx.Node) else None
        across = is_layer_norm(module) and len(module.normalized_shape) > 1
        if (
            writer is not None
            and writer.norm is None
            and len(source.users) == 1
            and not self.reused(name)
            and not across
            and self.fits(self.width(writer), width)
            and (value is None or value.ndim is None or value.channels_at(dim))
        ):
            writer.norm_name, writer.norm = name, module
            return value
        if value is None:
            return None
        reason = self.reused(name) or (
            "it normalises across more than their channels" if across else
            "it reads them flattened" if value.flattened else
            "it normalises another dim than their channels" if not value.channels_at(dim) else
            "their rank is unknown" if value.ndim is None and dim == 1 else
            f"it has {width} channels" if not self.fits(value.width, width) else None
        )  # fmt: skip
        if reason:
            self.refuse(value, f"{type(module).__name__} {name} reads them among other channels and {reason}, so its "
                               "β would flow into a masked channel")  # fmt: skip
            return None
        # A norm after a concatenation or an addition: each space is masked again at its offset there.
        width = value.width if self.widths is not None and value.width is not None else width
        shape = (width,) if dim == -1 else (1, width, *([1] * (value.ndim - 2)))
        self.add_points(name, module, value, shape)
        return replace(value, revived_by=None)

    # joins
    def elementwise(self, node: torch.fx.Node, product: bool) -> _Value | None:
        operands = [*node.args, *node.kwargs.values()]
        tensors = [self.values.get(a) if isinstance(a, torch.fx.Node) else a for a in operands]
        values = [v for v in tensors if isinstance(v, _Value)]
        numbers = [v for v in tensors if isinstance(v, (int, float)) and not isinstance(v, bool)]
        description = _describe(node, self.modules)
        if product and len(values) == 1 and len(numbers) == len(tensors) - 1:
            return values[0]  # a number times zero is zero
        factors = [a for a in operands if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        if product and len(values) == 1 and len(tensors) == 2 and factors and self.scaled(values[0], factors[0]):
            return values[0]  # a per-channel parameter times zero is zero
        joinable = (
            len(values) == len(tensors) == 2
            and all(len(v.segments) == 1 and v.segments[0][1] == 0 and not v.flattened for v in values)
            and values[0].width == values[1].width
            and values[0].channels_last == values[1].channels_last
        )
        if not joinable:
            for value in tensors:
                if isinstance(value, _Value):
                    self.refuse(value, f"{description} combines them with a tensor outside the channel graph")
            return None
        a, b = values
        index = self.union(a.segments[0][0], b.segments[0][0], description)
        # zero times anything is zero: a product is revived only if both factors are
        revived = (a.revived_by and b.revived_by) if product else (a.revived_by or b.revived_by)
        return _Value(((index, 0),), a.width, revived_by=revived, ndim=a.ndim or b.ndim, channels_last=a.channels_last)

    def scaled(self, value: _Value, factor: torch.fx.Node) -> bool:
        """Whether ``factor`` (a ``get_attr``) is a parameter of one entry per channel along ``value``'s channels
        (ConvNeXt's ``layer_scale``, (C, 1, 1)), read once, of no producer or norm; if so each space records it
        (``ChannelScale``), to be cut with its channels."""
        target = str(factor.target)
        parameter = _attribute(self.model, target)
        owner = self.modules.get(target.rpartition(".")[0])
        if (
            not isinstance(parameter, nn.Parameter)
            or value.layout is not None
            or isinstance(owner, (*PRODUCER_TYPES, *NORM_TYPES, *LAYER_NORMS))
            or self.attribute_reads.get(target, 0) != 1
            or value.flattened
            or value.width is None
            or (value.ndim is None and not value.channels_last)
            or (value.ndim is not None and parameter.ndim > value.ndim)
        ):
            return False
        dim = parameter.ndim - 1 if value.channels_last else parameter.ndim - value.ndim + 1
        others = [size for d, size in enumerate(parameter.shape) if d != dim]
        if dim not in (0, 1) or dim >= parameter.ndim or parameter.shape[dim] != value.width or set(others) - {1}:
            return False
        for index, offset in value.segments:
            self.space(index).scales.append(ChannelScale(target, dim, offset))
        return True

    def cat(self, node: torch.fx.Node) -> _Value | None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = self.argument(node, 1, "dim", 0)
        values = [self.values.get(p) if isinstance(p, torch.fx.Node) else None for p in parts]
        known = [value for value in values if value is not None]
        if not isinstance(dim, int) or not all(value.channels_at(dim) for value in known):
            self.refuse_unknown(node, values)
            return None
        if any(value is not None and value.layout is not None for value in values):
            return self.cat_layouts(node, values)
        segments: list[tuple[int, int]] = []
        offset: int | None = 0
        revived = None
        ndim = next((value.ndim for value in values if value is not None), None)
        for value in values:
            if value is None:
                offset = None
                continue
            if value.flattened:
                self.refuse_unknown(node, [value])
                offset = None
                continue
            revived = revived or value.revived_by
            if offset is None:
                self.refuse(value, f"{_describe(node, self.modules)} places them after a tensor of unknown width")
                continue
            segments += [(index, offset + inner) for index, inner in value.segments]
            offset = None if value.width is None else offset + value.width
        if not segments:
            return None
        return _Value(tuple(segments), offset, revived_by=revived, ndim=ndim, channels_last=known[0].channels_last)

    def cat_layouts(self, node: torch.fx.Node, values: list[_Value | None]) -> _Value | None:
        """A concatenation of reordered spaces: their layouts one after the other."""
        layouts = [self.layout_of(value) if value is not None else None for value in values]
        if any(layout is None for layout in layouts):
            for value in values:
                if value is not None:
                    self.refuse(
                        value, f"{_describe(node, self.modules)} places them beside a tensor of unknown channels"
                    )
            return None
        first = next(value for value in values if value is not None)
        revived = next((value.revived_by for value in values if value is not None and value.revived_by), None)
        joined = [position for layout in layouts for position in layout]  # type: ignore[union-attr]
        return self.with_layout(first, joined, revived_by=revived)


class _RouteSlots:
    """How many slots each route of a reordered space has in the network cut to a pruned share of every
    reordered space: traced once per share on such a cut (``compaction.cut.route_slots``), the model held weakly."""

    def __init__(self, model: nn.Module, graph: ChannelGraph) -> None:
        self.model = weakref.ref(model)
        self.graph = graph
        self.cache: dict[float, dict[str, dict[tuple[str, ...], int]]] = {}

    def of(self, name: str, amount: float) -> dict[tuple[str, ...], int]:
        if amount not in self.cache:
            from pruneflow.compaction.cut import route_slots  # compaction reads this module

            model = self.model()
            self.cache[amount] = {} if model is None else route_slots(model, self.graph, amount)
        return self.cache[amount].get(name, {})


class _LeafNormTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer with the LayerNorms the graph knows (``LAYER_NORMS``) kept as modules: torchvision's
    ``LayerNorm2d`` would otherwise be traced into, its weight read by ``get_attr`` outside its module."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            is_layer_norm(module)
            or is_window_attention(module)
            or is_partition_attention(module)
            or super().is_leaf_module(module, qualified_name)
        )


def trace_channel_graph(model: nn.Module, widths: Mapping[str, int] | None = None) -> ChannelGraph:
    """The channel spaces of ``model``, traced once with ``torch.fx``.

    A model that cannot be traced (data-dependent control flow) gets one space per conv and linear
    layer, each refused: without a graph, who reads a channel is unknown.
    """
    try:
        # ``stochastic_depth`` called from the model's own forward stays one op, as it is inside torchvision
        graph = _LeafNormTracer(autowrap_functions=(stochastic_depth,)).trace(model)
    except Exception as exc:  # data-dependent control flow, or no forward
        reason = f"torch.fx cannot trace {type(model).__name__} ({str(exc).splitlines()[0][:200]})"
        log.warning("channel graph: %s; nothing in it is prunable", reason)
        spaces = []
        for name, module in model.named_modules():
            if isinstance(module, PRODUCER_TYPES):
                layer = PrunableLayer(name, module)
                space = ChannelSpace(layer.num_channels, [layer], refusals=[reason])
                layer.space = space
                spaces.append(space)
        return ChannelGraph(spaces)
    return _Tracer(model, graph, widths).run()


def find_prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every producer (conv, depthwise conv, linear) of a prunable space of ``model``, with its norm,
    channel point and space."""
    return [layer for space in trace_channel_graph(model).prunable for layer in space.producers]


# -- selection ------------------------------------------------------------------------------------
def _spaces_of(layers: Sequence[PrunableLayer]) -> list[ChannelSpace]:
    return list({id(layer.space): layer.space for layer in layers if layer.space is not None}.values())


def select_spaces(
    spaces: Sequence[ChannelSpace], patterns: Iterable[str] | None, groups: bool = False
) -> list[ChannelSpace]:
    """The spaces to prune: by default every prunable one (coupled ones only when ``groups``);
    with ``patterns``, those with a producer matching a glob. A glob naming one member of a group
    selects the group, and the log says so; a glob that selects nothing is a ``ConfigError``.
    """
    prunable = [space for space in spaces if space.prunable]
    if patterns is None:
        return _with_tied(spaces, [space for space in prunable if (groups or not space.coupled) and not space.tied_to])
    chosen: dict[int, ChannelSpace] = {}
    for pattern in patterns:
        hits = [space for space in spaces if any(fnmatch.fnmatchcase(n, str(pattern)) for n in space.names)]
        hits = [space.tied_to if space.tied_to is not None else space for space in hits]  # pruned with what it reads
        if not hits:
            raise ConfigError(
                f"mask.layers pattern {pattern!r} matches no conv or linear layer; the model's are: "
                f"{', '.join(layer.name for space in spaces for layer in space.producers)}"
            )
        usable = [space for space in hits if space.prunable and (groups or not space.coupled)]
        if not usable:
            space = hits[0]
            reason = space.refusals[0] if space.refusals else "it is a coupled group and mask.groups=false"
            raise ConfigError(f"mask.layers pattern {pattern!r} selects {space.name}, which cannot be pruned: {reason}")
        for space in usable:
            matched = [n for n in space.names if fnmatch.fnmatchcase(n, str(pattern))]
            if space.grouped and len(matched) < len(space.names):
                log.info("mask.layers %r names %s: pruning its whole group %s", pattern, ", ".join(matched),
                         ", ".join(space.names))  # fmt: skip
            chosen[id(space)] = space
    return _with_tied(spaces, [space for space in spaces if id(space) in chosen])


def _with_tied(spaces: Sequence[ChannelSpace], chosen: list[ChannelSpace]) -> list[ChannelSpace]:
    """``chosen`` with the attention q/k/v spaces tied to any of them (``ChannelSpace.tied``), in graph order."""
    keys = {id(space) for space in chosen} | {id(tied) for space in chosen for tied in space.tied}
    return [space for space in spaces if id(space) in keys]


def select_layers(
    layers: Sequence[PrunableLayer], patterns: Iterable[str] | None, groups: bool = False
) -> list[PrunableLayer]:
    """The producers of the spaces ``select_spaces`` picks among the spaces of ``layers``."""
    return [layer for space in select_spaces(_spaces_of(layers), patterns, groups) for layer in space.producers]
