"""What the channel graph knows of layer types: producers, norms over the channels, depthwise convs, the attention
layers it keeps whole. Read by the graph's handlers, the masking strategies and the cut."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.maxvit import PartitionAttentionLayer, RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention

PRODUCER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
# LayerNorms over the channels, exact type → the dim they normalise: ``nn.LayerNorm`` the last (channels-last
# input), torchvision's ``LayerNorm2d`` dim 1. A subclass may compute something else: it stays refused.
LAYER_NORMS: dict[type[nn.Module], int] = {nn.LayerNorm: -1, LayerNorm2d: 1}
# Of those, the norms whose statistics span every channel and position of a sample (timm's ``GroupNorm1``, a
# GroupNorm of one group): over the kept channels they are the cut norm's, as a LayerNorm's are
SAMPLE_NORMS: set[type[nn.Module]] = set()
# Of those, the norms that divide by the channels' root mean square and take no mean (timm's ``RmsNorm2d``), with a
# per-channel γ and no β: over the kept channels they are the cut norm's too
RMS_NORMS: set[type[nn.Module]] = set()
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


def channel_multiplier(module: nn.Module) -> int:
    """k for a conv whose output channels c·k … c·k + k − 1 read input channel c only (groups = in channels,
    out = k · in, k > 1: a depthwise conv with a channel multiplier, FastViT's and PiT's); else 1."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or module.groups < 2 or module.groups != module.in_channels:
        return 1
    k, rest = divmod(module.out_channels, module.in_channels)
    return k if k > 1 and not rest else 1


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose output channel c reads input channel c only (groups = in = out channels); a transposed one too
    (LowFormer's upsampling), whose weight is then (C, 1, k, k) as a depthwise conv's."""
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d))
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


def statistics_dims(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """The dims a LayerNorm over the channels (``LAYER_NORMS``) takes its mean and variance over: the channels', or
    every dim but the batch for a norm over the whole sample (``SAMPLE_NORMS``); counted from 0."""
    return tuple(range(1, ndim)) if type(module) in SAMPLE_NORMS else (LAYER_NORMS[type(module)] % ndim,)


def is_producer(module: nn.Module) -> bool:
    """A conv or a linear layer: as a ``ChannelPoint`` its rows are cut, it has no γ to score or regularise."""
    return isinstance(module, PRODUCER_TYPES)


def norm_width(module: nn.Module) -> int:
    """The channels a BatchNorm or a LayerNorm over channels normalises (a conv's rows, where it is a
    ``ChannelPoint``: a depthwise conv carrying several spaces, a conv folded into the spaces it joins)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if is_layer_norm(module):
        return module.normalized_shape[0]
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels if is_producer(module) else module.num_features


def output_ndim(module: nn.Module) -> int | None:
    """Dimensions of a producer's output: (N, C, L) after a Conv1d, (N, C, H, W) after a Conv2d; a linear
    layer's input may have any rank."""
    return 3 if isinstance(module, nn.Conv1d) else 4 if isinstance(module, nn.Conv2d) else None  # subclasses too


class PackedInProjection(nn.Linear):
    """``nn.MultiheadAttention``'s packed q, k, v projection seen as the linear layer it is (``weight``, ``bias``,
    ``in_features``, ``out_features``): the attention's own ``in_proj_weight`` and ``in_proj_bias``, not copies, so
    a strategy's zeroing and a criterion's scores act on the tensors the attention computes with. Not a module of
    the model (the attention is): a producer's record only."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)  # no tensors of its own
        self.__dict__["attention"] = attention  # not a submodule: ``modules()`` of the record stays this one

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.attention.in_proj_weight

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return self.attention.in_proj_bias

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return int(self.attention.in_proj_weight.shape[1])

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return int(self.attention.in_proj_weight.shape[0])


class RowBlocks(nn.Linear):
    """A linear layer whose rows are ``blocks`` equal blocks of one space's channels (PVT-v2's and Twins' ``kv``: the
    k rows, then the v rows, channel c at row ``c`` of each block) seen as a producer of that space: ``weight`` and
    ``bias`` are views of the layer's own, (C, blocks, in) and (C, blocks), so a criterion's score of channel c is
    over its rows in every block and a zeroing writes through. Not a module of the model (the layer is): a
    producer's record only; the cut takes channel c's row from every block (``rows``)."""

    def __init__(self, linear: nn.Linear, blocks: int) -> None:
        nn.Module.__init__(self)  # no tensors of its own
        self.__dict__["linear"] = linear  # not a submodule: ``modules()`` of the record stays this one
        self.blocks = blocks

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.linear.weight.view(self.blocks, self.out_features, -1).transpose(0, 1)

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        bias = self.linear.bias
        return None if bias is None else bias.view(self.blocks, self.out_features).transpose(0, 1)

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.linear.in_features

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.linear.out_features // self.blocks

    def rows(self, channels: Tensor) -> Tensor:
        """The layer's rows that write ``channels`` (ascending), one per block."""
        return torch.cat([channels + block * self.out_features for block in range(self.blocks)])


class TransposedRows(nn.Conv2d):
    """A dense ``nn.ConvTranspose2d`` (groups 1) seen as a conv's rows: its weight is (in, out, k, k), its output
    channels along dim 1, so ``weight`` is its transpose (out, in, k, k), a view (a zeroing writes through), ``bias``
    its own. Not a module of the model (the transposed conv is, its channel point): a producer's record only; the cut
    takes its weight's rows along dim 1 (``compaction.layouts.tensor_keep``)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        nn.Module.__init__(self)  # no tensors of its own
        self.__dict__["conv"] = conv  # not a submodule: ``modules()`` of the record stays this one
        self.groups, self.in_channels, self.out_channels = conv.groups, conv.in_channels, conv.out_channels

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.conv.weight.transpose(0, 1)

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return self.conv.bias


class LSTMUnits(nn.Linear):
    """An ``nn.LSTM``'s hidden units (one layer, no projection) seen as a producer's rows: unit j owns rows j, H + j,
    2H + j and 3H + j (its input, forget, cell and output gates) of every direction's ``weight_ih``, ``weight_hh`` and
    biases. ``weight`` gathers them, (H, 4, columns of all those tensors): a copy, what a criterion scores and the
    telemetry measures; the strategies zero, mask and reset the LSTM's own tensors (``kernel_tensors``), and
    ``activation`` masks the rows in the LSTM's own forward (``ROWS_MASKED_FORWARDS``). Not a module of the
    model (the LSTM is): a producer's record only."""

    def __init__(self, lstm: nn.LSTM) -> None:
        nn.Module.__init__(self)  # no tensors of its own
        self.__dict__["lstm"] = lstm  # not a submodule: ``modules()`` of the record stays this one

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        blocks = [tensor.view(4, self.out_features, -1) for tensor in self.lstm._flat_weights]
        return torch.cat(blocks, -1).transpose(0, 1)

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return None  # the biases are columns of ``weight``

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self.lstm.input_size

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self.lstm.hidden_size


@contextmanager
def attention_op_by_op() -> Iterator[None]:
    """``nn.MultiheadAttention`` on its op-by-op path for the block, as when training: its inference fast path is one
    fused op (``_native_multi_head_attention``) the FLOP counter has no formula for, so it would count none of the
    attention's FLOPs. Both paths compute the same function."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def kernel_tensors(producer: nn.Module) -> list[Tensor]:
    """The leaf parameters whose rows (dim 0) write a producer's channels, as the optimizer holds them: its weight and
    bias; every tensor of an LSTM (``LSTMUnits``), a unit's four gate rows in each (``kernel_row_mask``)."""
    if isinstance(producer, LSTMUnits):
        return [getattr(producer.lstm, name) for name in producer.lstm._flat_weights_names]
    return [producer.weight] if producer.bias is None else [producer.weight, producer.bias]


def kernel_row_mask(producer: nn.Module, pruned: Tensor) -> Tensor:
    """The rows of ``kernel_tensors`` that write the ``pruned`` channels (a boolean mask over dim 0): the channels
    themselves; an LSTM unit j's rows j, H + j, 2H + j and 3H + j."""
    return pruned.repeat(4) if isinstance(producer, LSTMUnits) else pruned


def held_by(producer: nn.Module) -> nn.Module:
    """The module holding a producer's weight and bias (a parametrization goes there): the producer itself, or the
    attention whose packed ``in_proj`` a ``PackedInProjection`` is."""
    return producer.attention if isinstance(producer, PackedInProjection) else producer


def tensor_names(producer: nn.Module) -> tuple[str, str]:
    """A producer's weight and bias as ``held_by`` names them."""
    return ("in_proj_weight", "in_proj_bias") if isinstance(producer, PackedInProjection) else ("weight", "bias")


def qkv_tensors(attention: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An attention's q, k, v projection (weight, bias): Swin's ``qkv`` layer, ``nn.MultiheadAttention``'s packed
    ``in_proj``, BEiT's and EVA's ``qkv`` with q and v biases of their own."""
    if isinstance(attention, nn.MultiheadAttention):
        return attention.in_proj_weight, attention.in_proj_bias
    if getattr(attention, "q_bias", None) is not None:
        return attention.qkv.weight, torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
    return attention.qkv.weight, attention.qkv.bias


def input_weight(module: nn.Module) -> Tensor:
    """The weight whose dim 1 reads a consumer's input: its ``weight``, ``nn.MultiheadAttention``'s ``in_proj``, an
    ``nn.LSTM``'s ``weight_ih_l0``."""
    if isinstance(module, nn.LSTM):  # every direction reads the same columns
        return module.weight_ih_l0
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
