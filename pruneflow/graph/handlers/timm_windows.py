"""Window attention, channels last: the reshapes that cut a feature map (B, H, W, C) into windows and put it back,
the patch merging that lays 2 × 2 neighbours side by side, and timm's window attentions (Swin, SwinV2, SwinV2-CR,
SAM-ViT, Hiera).

A reshape whose last size is its input's width read from a shape (``C`` of ``B, H, W, C = x.shape``), of a tensor
whose channels are last, keeps them last and in order: in row-major order its last dim is its input's last dim,
whatever the other sizes (``window_partition``'s ``x.view(B, H // ws, ws, W // ws, ws, C)``, ``view(-1, ws * ws,
C)``, a block's ``x.reshape(B, -1, C)``). Read from a shape, the width follows a cut; where it is another tensor's
(the attention's output viewed by its input's ``C``), the two must end up one space (the residual joins them),
which ``widths`` checks after the walk. ``-1`` last does the same where every other size is one of the sizes but the
channels' of a tensor of the same stream, each once (SAM's ``x.reshape(B, H * W, -1)``), or of the tensor an LSTM
read, whose positions its output keeps (Sequencer2D's ``v.reshape(B, W, H, -1)``), or where the other sizes
are numbers and a conv or linear layer built for the width reads the result's last dim (CoaT's tokens back to a map
before its next patch embedding). A number written in the
model instead would not follow a cut: such a reshape goes to the probe (``reorderings``) as before. timm's
``window_reverse``, NesT's ``deblockify`` and SAM's ``window_unpartition`` (each recorded as one op) read ``C`` from
their input and keep it last.

A flatten of the dims just before the channels, whose sizes are numbers in the reshape that made them (patch
merging's ``reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)``), lays that many copies of
the channels side by side: the stream read 4 times over by the merging's norm and reduction, as torchvision's
``_patch_merging_pad`` is read (``attention.patch_merging_pad``). A flatten of dims before the channels only (Hiera's
unroll, strides into the batch) and a max over positions (its q pooling) keep them last.

Swin's attentions are kept whole, their q/k/v rows tied to the stream they read (``attention.tied_heads``): SwinV2's and
SwinV2-CR's reshape their heads' output by their input's width (``reshape(B_, N, C)``, ``C // num_heads``), so their
head width is the stream's; Swin's by ``-1``, from ``qkv``'s width, tied all the same (its head width is the stream's
unless built with another ``head_dim``, which is refused). Per position of a head they are exact: Swin's logits are
scaled by ``scale``, fixed at construction; its fused path, which would divide by the cut head width, is kept: the cut
folds the full width's scale into its q rows and ``scale`` (``ChannelSpace.scaled_by_cut``), as DaViT's. SwinV2's and
SwinV2-CR's cosine attention normalises q and k over a head's positions, where a zero position adds nothing. The
relative position bias is per head and the head count stays. SwinV2's ``q_bias``/``v_bias`` are read through
``F.linear`` as BEiT's are (``timm_attention_classes``): the attention is the rows' channel point, computed again with
its call's ``mask=``. SAM's and Hiera's attentions reshape by their head count and a head width of their own: cut in
whole heads, as timm's ``Attention`` (``timm_attention``). DaViT's window attention reshapes as Swin's: per position of
a head, tied to the stream, which DaViT's channel attention also reads per position of its heads, as many
(``timm_davit``); its ``window_reverse`` is read as Swin's. NesT's writes its heads' output head-minor: tied to the
stream with the same value positions in every head (``timm_pyramid_attention``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph.handlers import shapes, tokens
from pruneflow.graph.handlers import timm_attention as timm_attention_module
from pruneflow.graph.handlers.attention import tied_heads
from pruneflow.graph.handlers.timm_attention import timm_attention, unreadable_parts
from pruneflow.graph.handlers.timm_attention_classes import bias_scales, forward_with_rows, refused
from pruneflow.graph.nodes import argument
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import (
    ROWS_MASKED_FORWARDS,
    register_function_handler,
    register_method_handler,
    register_module_handler,
)
from pruneflow.graph.values import Value
from pruneflow.graph.widths import channel_dim, width_of

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def channels_last(value: Value | None) -> bool:
    """Whether ``value``'s channels are whole and in its last dim, of a known rank (what a window op reads)."""
    usable = value is not None and value.ndim is not None and value.layout is None and value.probe is None
    return usable and not value.flattened and value.channels_at(-1)


def read_width(tracer: Tracer, size: Any, width: int | None) -> bool:
    """Whether ``size`` is the width ``width`` of a tensor's channels, read from its shape (``x.shape[-1]``)."""
    source, dim = tracer.shape_reads.get(size, (None, None)) if isinstance(size, torch.fx.Node) else (None, None)
    where = channel_dim(source) if source is not None else None
    return where is not None and isinstance(dim, int) and dim % source.ndim == where and source.width == width


def position_reads(tracer: Tracer, size: Any) -> list[tuple[Value, int]] | None:
    """The (tensor, dim) sizes read from shapes whose product ``size`` is (``H * W``); None for anything else."""
    if not isinstance(size, torch.fx.Node):
        return None
    if size in tracer.shape_reads:
        source, dim = tracer.shape_reads[size]
        return [(source, dim)] if isinstance(dim, int) and source.ndim is not None else None
    if size.op != "call_function" or size.target is not operator.mul or len(size.args) != 2:
        return None
    factors = [position_reads(tracer, factor) for factor in size.args]
    return None if factors[0] is None or factors[1] is None else factors[0] + factors[1]


def every_position(tracer: Tracer, value: Value, sizes: Sequence[Any]) -> bool:
    """Whether ``sizes`` are every size but the channels' of one tensor of ``value``'s spaces, each once, read from
    its shape (SAM's ``x.reshape(B, H * W, -1)``, ``B, H, W, _ = x.shape``): what ``-1`` leaves is the width. The
    stream keeps its positions between the read and the reshape, as a block's residual stream does."""
    reads = [position_reads(tracer, size) for size in sizes]
    if any(read is None for read in reads):
        return False
    dims = [entry for read in reads for entry in read]  # type: ignore[union-attr]
    source = dims[0][0] if dims else None
    where = channel_dim(source) if source is not None else None
    if where is None or any(other is not source for other, _ in dims) or not same_positions(tracer, source, value):
        return False
    return sorted(d % source.ndim for _, d in dims) == [d for d in range(source.ndim) if d != where]


def same_positions(tracer: Tracer, source: Value, value: Value) -> bool:
    """Whether ``value`` has ``source``'s positions: both of one stream, as wide, or ``value`` written by an op that
    keeps its input's positions from a tensor of ``source``'s spaces (an LSTM's units: ``Tracer.same_positions``)."""
    root = tracer.union_find.root
    roots = [frozenset(root(index) for index, _ in v.segments) for v in (source, value)]
    if roots[0] == roots[1]:
        return source.width == value.width
    written = {frozenset({root(index)}): frozenset(root(i) for i in read) for index, read in tracer.same_positions}
    return written.get(roots[1]) == roots[0]


def windows_view(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.view(..., C)``/``x.reshape(..., C)`` of channels-last ``x``, ``C`` its width read from a shape, or ``-1``
    after every other size of a tensor of its spaces: the channels stay last, in order; anything else as
    ``tokens.spatial_reshape`` (then ``patch_tokens``, ``shapes.view``) reads it."""
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if not channels_last(value) or len(sizes) < 2:
        return tokens.spatial_reshape(tracer, node, value)
    width = read_width(tracer, sizes[-1], value.width)
    rest = sizes[-1] == -1 and (every_position(tracer, value, sizes[:-1]) or pinned_rest(tracer, node, value, sizes))
    if not width and not rest:
        return tokens.spatial_reshape(tracer, node, value)
    return replace(value, ndim=len(sizes), channels_last=len(sizes) > 2)


def pinned_rest(tracer: Tracer, node: torch.fx.Node, value: Value, sizes: Sequence[Any]) -> bool:
    """Whether ``-1`` last is the width because a layer reading it as its channels is built for that width (CoaT's
    ``x[:, 1:].reshape(B, H, W, -1).permute(0, 3, 1, 2)`` before its next stage's patch embedding), the other sizes
    numbers or sizes read from no channel dim: they stay as the cut leaves them, so ``-1`` follows the width."""
    if any(isinstance(size, torch.fx.Node) and width_of(tracer, size) for size in sizes[:-1]):
        return False
    if not all(isinstance(size, (int, torch.fx.Node)) for size in sizes[:-1]):
        return False
    readers, reached = [(node, len(sizes) - 1)], []
    while readers:
        tensor, at = readers.pop()
        for user in tensor.users:
            dims = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) else user.args[1:]
            if user.op == "call_method" and user.target == "permute" and all(isinstance(d, int) for d in dims):
                readers.append((user, [d % len(sizes) for d in dims].index(at)))
            elif user.op == "call_method" and user.target == "contiguous":
                readers.append((user, at))
            elif user.op == "call_module":
                reached.append(read_width_at(tracer.modules[str(user.target)], at, len(sizes)))
            elif not (user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",)):
                reached.append(None)
    return value.width in reached or not reached


def read_width_at(module: nn.Module, at: int, ndim: int) -> int | None:
    """The width a conv (channels at dim 1) or a linear layer (channels last) reads at dim ``at``; None elsewhere."""
    if isinstance(module, nn.Linear) and at == ndim - 1:
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and at == 1:
        return module.in_channels
    return None


def window_reverse(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """timm's ``window_reverse(windows, window_size, ...)``: windows (B·nW, ws, ws, C) back to (B, H, W, C), ``C``
    read from the windows' shape: the channels stay last."""
    if not channels_last(value):
        tracer.refuse_unknown(node, [value])
        return None
    return replace(value, ndim=4, channels_last=True)


def literal_sizes(node: Any, ndim: int) -> list[int | None] | None:
    """The sizes of ``node``'s dims that are numbers in the reshape that made it (through permutes and
    ``contiguous``), None for the others; None where no such reshape made it."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_method":
        return None
    if node.target == "contiguous":
        return literal_sizes(node.args[0], ndim)
    if node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        before = literal_sizes(node.args[0], ndim)
        return [before[d] for d in dims] if before is not None and all(isinstance(d, int) for d in dims) else None
    if node.target in ("view", "reshape"):
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [s if isinstance(s, int) and s > 0 else None for s in sizes] if len(sizes) == ndim else None
    return None


def merged_neighbours(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.flatten(k)`` of channels-last ``x`` whose dims k … before the channels have sizes written as numbers
    (patch merging's 2 × 2): that many copies of the channels side by side; a flatten of dims before the channels
    only (Hiera's unroll, strides into the batch) keeps them last; anything else as ``shapes.flatten``."""
    start, end = argument(node, 1, "start_dim", 0), argument(node, 2, "end_dim", -1)
    if not channels_last(value) or not isinstance(start, int) or not isinstance(end, int):
        return shapes.flatten(tracer, node, value)
    if value.ndim > 2 and start % value.ndim <= end % value.ndim < value.ndim - 1:
        return replace(value, ndim=value.ndim - (end % value.ndim - start % value.ndim))
    if end not in (-1, value.ndim - 1):
        return shapes.flatten(tracer, node, value)
    start %= value.ndim
    sizes = literal_sizes(node.args[0], value.ndim) if 0 < start < value.ndim - 1 else None
    copied = sizes[start:-1] if sizes is not None else [None]
    layout = tracer.layout_of(value)
    if None in copied or layout is None:
        return shapes.flatten(tracer, node, value)
    ndim = start + 1
    return tracer.with_layout(value, layout * math.prod(copied), ndim=ndim, channels_last=ndim > 2)


def unhandled_window_variant(tracer: Tracer, node: torch.fx.Node, module: nn.Module) -> str | None:
    """Why a window attention's heads cannot follow the stream (None: they can)."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if any(tracer.values.get(other) is not None for other in others):
        return "is called with another tensor of channels besides its input"
    if reason := unreadable_parts(module):
        return reason
    if module.qkv.out_features != 3 * module.qkv.in_features or module.proj.in_features != module.qkv.in_features:
        return "has heads whose width is not its input's (head_dim set)"
    return None


def window_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """timm's Swin, SwinV2 and SwinV2-CR window attention, a leaf: heads tied to the stream (module docstring)."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    reason = unhandled_window_variant(tracer, node, module)
    if reason:
        return refused(tracer, proj, value, f"window attention {name} {reason}")
    biased = getattr(module, "q_bias", None) is not None
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, **({"unit_name": name, "unit": module} if biased else {}))
    inner, output = tied_heads(tracer, name, qkv, proj, module.num_heads, value)
    if biased:  # SwinV2's: no fused path, the cut's step sets its zero key bias
        tracer.spaces[inner].unfused_by_cut = name
    elif hasattr(module, "fused_attn"):  # its fused path kept: the full width's scale folded into its q rows
        tracer.spaces[inner].scaled_by_cut = name
    if biased:
        tracer.spaces[inner].scales += bias_scales(name, module)
    return output


def register() -> None:
    from timm.models import (
        davit,
        hiera,
        nest,
        swin_transformer,
        swin_transformer_v2,
        swin_transformer_v2_cr,
        vision_transformer_sam,
    )

    register_method_handler(("view", "reshape"), windows_view)
    register_method_handler("flatten", merged_neighbours)
    register_method_handler("amax", tokens.token_mean)  # a max over positions (Hiera's q pooling), as a mean's
    # Hiera's attention reshapes by its head count and head width, held in ``heads``, ``head_dim``: whole heads
    timm_attention_module.HEAD_ATTRIBUTES[hiera.MaskUnitAttention] = ("heads", "dim_out")
    register_module_handler(hiera.MaskUnitAttention, timm_attention)
    for function in (swin_transformer.window_reverse, swin_transformer_v2.window_reverse,
                     swin_transformer_v2_cr.window_reverse, nest.deblockify, davit.window_reverse):  # fmt: skip
        register_function_handler(function, window_reverse)
    # SAM's ``window_unpartition`` reads ``C`` as the ``-1`` left once the windows' other sizes are put back: one op
    register_function_handler(vision_transformer_sam.window_unpartition, window_reverse, autowrap=True)
    # SAM's attention reshapes by its head count and ``-1``: whole heads, as timm's ``Attention`` (its relative
    # position tables are per position of a head, shared by all heads, so a head's positions stay)
    register_module_handler(vision_transformer_sam.Attention, timm_attention)
    attentions = (swin_transformer.WindowAttention, swin_transformer_v2.WindowAttention,
                  swin_transformer_v2_cr.WindowMultiHeadAttention, davit.WindowAttention)  # fmt: skip
    register_module_handler(attentions, window_attention)
    ROWS_MASKED_FORWARDS[swin_transformer_v2.WindowAttention] = forward_with_rows
