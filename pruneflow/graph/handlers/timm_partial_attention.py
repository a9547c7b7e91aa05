"""timm's attentions over parts of the stream's channels on maps (B, C, H, W), kept whole: EfficientViT-MSRA's cascaded
group attention (``LocalWindowAttention``, one equal chunk of the stream per head) and SHViT's single-head attention
(``SHSA``, the first ``pdim`` channels). The stream they read, the value rows that go back into it and
EfficientViT's key rows are cut; what is not exact is refused in one line naming the attention.

``LocalWindowAttention`` partitions its map into windows (reshapes by its input's ``C``) and runs
``CascadedGroupAttention`` on each: the input chunked into one part per head (``x.chunk(num_heads)``); head i's
``qkvs[i]`` (a conv and its BatchNorm) reads chunk i plus head i − 1's output and writes ``key_dim`` q rows (through a
depthwise conv and its BatchNorm, ``dws[i]``), ``key_dim`` k rows and ``val_dim`` v rows, reshaped by those sizes;
``attn @ v`` computes output channel j from value row j alone; the heads' outputs are concatenated and ``proj`` (a
ReLU, then a conv and its BatchNorm) writes the output. So:

- the stream is cut at the same positions in every chunk (``ChannelSpace.groups``: the chunks stay equal, as
  ``val_dim``, which the cut sets through the split it records, sizes them) and head i's value rows are cut with the
  chunk it is added to, chunk i + 1 (the last head's with chunk 0: its only reader is ``proj``, which reads the
  heads' values in order, head i's at chunk i + 1's positions): points of the stream, masked after their BatchNorm,
  so a pruned position is 0 in the chunk and in the value added to it, and ``attn @ v`` keeps it 0;
- the q and k rows of every head are one space, cut at the same positions from q and k (q·k loses only zero
  terms; ``scale`` is fixed at construction) and in every head (``key_dim`` sizes all of them: the cut sets it):
  ``dws[i]`` its producers (masked after their BatchNorm, whose β would revive a pruned q row), ``qkvs[i]``'s q and
  k rows its points. The per-head attention biases stay (no head goes).

``SHSA`` splits its input at ``pdim`` (``torch.split(x, [pdim, dim - pdim])``), normalises the first part
(``pre_norm``, a GroupNorm of one group: a norm over each sample's channels, recomputed over the kept ones by
``activation``), reads it with ``qkv`` (a conv and its BatchNorm: ``qk_dim`` q and k rows, then ``pdim`` value rows)
and concatenates ``attn @ v``, reshaped by ``pdim``, with the second part for ``proj`` (a ReLU, then a conv and its
BatchNorm): ``proj`` reads the stream's layout, the values in place of the first part. So the value rows are cut
with the first part's channels (points of the stream), the split is recorded (each part keeps its share; the cut
sets ``pdim`` and ``dim``), ``pre_norm`` is a point of the first part; the q and k rows stay whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.pointwise import keeps_zero
from pruneflow.graph.handlers.reorderings import EqualParts, first_size_in
from pruneflow.graph.handlers.slices import record
from pruneflow.graph.handlers.timm_mobile_attention import conv_layer
from pruneflow.graph.layers import LAYER_NORMS, SAMPLE_NORMS, is_depthwise
from pruneflow.graph.records import ChannelPoint, ChannelSpace, Consumer, rows_as_points
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def stream_problem(tracer: Tracer, name: str, module: nn.Module, value: Value | None, width: int) -> str | None:
    """Why the stream an attention ``module`` reads cannot be cut with it (None: it can): not one whole space on
    dim 1, revived, of another width, the attention called twice, or a ``proj`` whose activation revives a 0."""
    whole = one_whole_space(value) and value.channels_at(1) and not value.flattened
    if not whole or value.width != width:
        return "reads a tensor that is not one whole space of its width"
    if value.revived_by is not None:
        return f"reads channels {value.revived_by} turned from 0 into f(0) ≠ 0"
    if not keeps_zero(module.proj[0]):
        return f"activates its heads' output with {type(module.proj[0]).__name__}, which turns a 0 into another value"
    return tracer.reused(name)


def refused(tracer: Tracer, value: Value | None, reason: str) -> Value | None:
    """The stream refused in one line; the output, as wide as the input and added back into it, read as it."""
    tracer.refuse(value, reason)
    return value


def output(tracer: Tracer, name: str, module: nn.Module) -> Value:
    """A new space written by ``proj``'s conv and BatchNorm (after its ReLU), on a map."""
    proj = conv_layer(f"{name}.proj.1", module.proj[1])
    return Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=4)


def in_part(width: int, start: int, size: int, first: int = 0) -> tuple[int, ...]:
    """Channel c of a ``width``-wide space → entry ``first + c - start`` where it lies in ``[start, start + size)``,
    else -1 (not read there)."""
    return tuple(first + c - start if start <= c < start + size else -1 for c in range(width))


def cascaded_keys(tracer: Tracer, name: str, attention: nn.Module) -> ChannelSpace:
    """Every head's q and k rows, one space: ``dws[i]`` its producers, ``qkvs[i]``'s q rows (from 0) and k rows
    (from ``key_dim``) its points; the cut sets ``key_dim``."""
    keys = None
    for head in range(attention.num_heads):
        index = tracer.new_space(conv_layer(f"{name}.dws.{head}", attention.dws[head]))
        qkv = conv_layer(f"{name}.qkvs.{head}", attention.qkvs[head])
        tracer.space(index).points.extend(rows_as_points(qkv) + rows_as_points(qkv, offset=attention.key_dim))
        keys = index if keys is None else tracer.union(keys, index, f"attention {name}'s key_dim, one for every head")
    space = tracer.space(keys)
    space.held_by.append((name, "key_dim"))
    return space


def cascaded_layout(attention: nn.Module, width: int) -> str | None:
    """Why ``CascadedGroupAttention``'s heads cannot be read as equal chunks of its input (None: they can)."""
    heads = attention.num_heads
    if width % heads or attention.val_dim != width // heads:
        return f"adds values of {attention.val_dim} channels into chunks of {width} / {heads}"
    if not all(is_depthwise(dws.conv) for dws in attention.dws):
        return "runs its queries through convs that are not depthwise"
    return None


def cascaded_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """EfficientViT-MSRA's ``LocalWindowAttention``, a leaf: its stream cut at the same positions in each head's chunk,
    head i's value rows with chunk i + 1's channels, ``proj`` reading each head's values there; its heads' q and k
    rows one space (``cascaded_keys``); ``proj`` writes the output."""
    name, attention = str(node.target), module.attn
    why = f"attention {name} (LocalWindowAttention)"
    if reason := stream_problem(tracer, name, attention, value, module.dim) or cascaded_layout(attention, module.dim):
        return refused(tracer, value, f"{why} {reason}")
    heads, width, chunk = attention.num_heads, module.dim, module.dim // attention.num_heads
    inner, stream = f"{name}.attn", tracer.space(value.segments[0][0])
    stream.groups = tracer.joined_groups(stream, heads, f"{why}'s chunks, one per head")
    record(tracer, value.segments[0][0], inner, (chunk,) * heads)  # ``val_dim`` sizes them: the cut sets it
    for head in range(heads):
        qkv = conv_layer(f"{inner}.qkvs.{head}", attention.qkvs[head])
        stream.consumers.append(Consumer(qkv.name, "conv", at=in_part(width, head * chunk, chunk)))
        added_to = (head + 1) % heads * chunk  # the chunk its values are added to (the last head's: read by proj)
        stream.points += rows_as_points(qkv, at=in_part(width, added_to, chunk, 2 * attention.key_dim))
    rotated = tuple((c - chunk) % width for c in range(width))  # proj reads head i's values at chunk i + 1's places
    stream.consumers.append(Consumer(f"{inner}.proj.1.conv", "conv", at=rotated))
    cascaded_keys(tracer, inner, attention)
    return output(tracer, inner, attention)


def pre_norm_problem(module: nn.Module) -> str | None:
    """Why ``SHSA``'s ``pre_norm`` cannot be cut with the stream's first part (None: it can): a norm other than one
    over each sample's channels (a GroupNorm of one group, a LayerNorm over dim 1) or a BatchNorm."""
    norm = module.pre_norm
    if type(norm) in SAMPLE_NORMS or LAYER_NORMS.get(type(norm)) == 1 or type(norm) in (nn.BatchNorm2d, nn.Identity):
        return None
    return f"normalises its part of the stream with {type(norm).__name__} pre_norm, which is not a norm over each " \
           "sample's channels"  # fmt: skip


def single_head_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """SHViT's ``SHSA``, a leaf: its split at ``pdim`` recorded on the stream (the cut sets ``pdim`` and ``dim``),
    ``pre_norm`` a point of the first part, ``qkv`` reading it, its value rows cut with it, ``proj`` reading the
    stream's layout; ``qkv``'s q and k rows stay whole; ``proj`` writes the output."""
    name, width, pdim = str(node.target), module.dim, module.pdim
    if reason := stream_problem(tracer, name, module, value, width) or pre_norm_problem(module):
        return refused(tracer, value, f"single-head attention {name} (SHSA) {reason}")
    stream, first = tracer.space(value.segments[0][0]), in_part(width, 0, pdim)
    record(tracer, value.segments[0][0], name, (pdim, width - pdim))
    if not isinstance(module.pre_norm, nn.Identity):
        stream.points.append(ChannelPoint(f"{name}.pre_norm", module.pre_norm, 0, (1, pdim, 1, 1), at=first))
    qkv = conv_layer(f"{name}.qkv", module.qkv)
    stream.consumers.append(Consumer(qkv.name, "conv", at=first))
    stream.points += rows_as_points(qkv, at=in_part(width, 0, pdim, 2 * module.qk_dim))
    stream.consumers.append(Consumer(f"{name}.proj.1.c", "conv"))
    return output(tracer, name, module)


def register() -> None:
    from timm.models.efficientvit_msra import CascadedGroupAttention, LocalWindowAttention
    from timm.models.shvit import SHSA

    register_module_handler(LocalWindowAttention, cascaded_attention)
    register_module_handler(SHSA, single_head_attention)
    register_split_sizes(CascadedGroupAttention, EqualParts("val_dim"))
    register_split_sizes(SHSA, first_size_in("pdim", whole="dim"))
