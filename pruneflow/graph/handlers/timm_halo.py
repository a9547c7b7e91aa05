"""timm's HaloNet and BoTNet attentions (``HaloAttn``, ``BottleneckAttn``), kept whole: their q, k and v rows and
the output they write are one space, cut at the same positions in every head.

``HaloAttn`` reads its input (B, C, H, W) with two 1 × 1 convs, ``q`` (heads × ``dim_head_qk`` rows, head-major,
taken on the blocks of the map) and ``kv`` (per head ``dim_head_qk`` key rows, then ``dim_head_v`` value rows: it
reshapes ``kv`` by ``(B · heads, dim_head_qk + dim_head_v, …)`` and splits each head there), unfolds the keys and
values into halo windows around each block (positions only), and writes ``attn @ v`` head by head as its output:
output channel h · ``dim_head_v`` + j is value row j of head h, channel for channel (the softmax runs over positions).
Its logits add ``q @ k`` and the relative position logits ``PosEmbedRel`` computes from q alone with two tables,
``height_rel`` and ``width_rel``, one column per head position, shared by every head.

So ``kv``'s rows are the space (a producer, masked at its output), in ``heads`` equal blocks (one per head:
``ChannelSpace.groups``, the same positions in each, since the tables' columns serve every head and the forward
reshapes every head by one width), split in each block into key and value positions (``SplitSizes``, whose sizes
the cut sets: ``dim_head_qk``, ``dim_head_v``, the widths of all heads ``dim_out_qk``, ``dim_out_v``, and the
tables' ``dim_head``). ``q``'s rows are points of the key positions (masked at its output: a masked key position is
0 in q, so it adds 0 to ``q @ k`` and to the position logits alike; the scale stays as constructed, so the cut
computes the masked network exactly), the tables' columns per-channel parameters of head 0's key positions
(``ChannelScale``), and the output carries the value positions in the attention's order, read by whatever reads it
(a norm as a point, a conv's columns). A key or value part left empty would leave a reshape of width 0: the criteria
keep a position of each (``select_in_groups``), the cut refuses an explicit selection that empties one.

BoTNet's ``BottleneckAttn`` reads the same relative position logits over the whole map, from one 1 × 1 conv ``qkv``
whose rows are every head's q, then every head's k, then every head's v (``torch.split`` by ``dim_out_qk`` and
``dim_out_v``, each reshaped by its head width): with heads of equal q/k and v widths, its rows are ``3 · heads``
equal blocks cut at the same positions (``ChannelSpace.groups``), its tables' columns follow head 0's q positions,
its output is its v rows in order, and the cut sets its head widths; with unequal widths the blocks are not equal,
and its rows are refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.records import ChannelPoint, ChannelScale, PrunableLayer, SplitSizes
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

POSITION_TABLES = ("height_rel", "width_rel")


def unhandled_variant(module: nn.Module, projections: tuple[str, ...], rows: int) -> str | None:
    """Why an attention's ``projections`` (1 × 1 convs) cannot be cut as the module docstring reads them, where
    together they write ``rows`` (None: they can)."""
    layers = [getattr(module, name) for name in projections]
    if any(type(layer) is not nn.Conv2d for layer in layers):
        return f"projects with other layers than nn.Conv2d {' and '.join(projections)}"
    if sum(layer.out_channels for layer in layers) != rows:
        heads, key, value = module.num_heads, module.dim_head_qk, module.dim_head_v
        return f"has q, k, v rows that are not {heads} heads of {key} key and {value} value positions"
    if any(layer.groups != 1 for layer in layers):
        return "projects with grouped convs"
    return None


def head_sizes(module: nn.Module, sizes: tuple[int, ...] | list[int]) -> dict[str, int]:
    """The sizes a ``HaloAttn`` or ``BottleneckAttn`` reshapes by, for ``sizes`` = (key, value) positions kept per
    head, or (positions,) kept per head in each of q, k and v."""
    heads = module.num_heads
    key, value = sizes[0], sizes[-1]
    return {"dim_head_qk": key, "dim_head_v": value, "dim_out_qk": heads * key, "dim_out_v": heads * value}


def table_width(table: nn.Module, sizes: tuple[int, ...] | list[int]) -> dict[str, int]:
    """The head width a ``PosEmbedRel`` holds: the q (or key) positions kept per head, the first of ``sizes``."""
    return {"dim_head": sizes[0]}


def position_tables(tracer: Tracer, index: int, name: str, sizes: tuple[int, ...]) -> None:
    """The relative position tables of attention ``name`` (``pos_embed``, one column per q position of a head):
    scales of the space's first ``sizes[0]`` channels (head 0's q or k positions); ``sizes``, the split of head 0's
    channels the cut sets (``head_sizes``), sets the tables' width too."""
    space = tracer.space(index)
    first_head = tuple(c if c < sizes[0] else -1 for c in range(space.width))
    space.scales += [ChannelScale(f"{name}.pos_embed.{table}", 1, 0, at=first_head) for table in POSITION_TABLES]
    space.splits += [SplitSizes(name, sizes), SplitSizes(f"{name}.pos_embed", sizes)]


def values_out(tracer: Tracer, index: int, positions: list[int]) -> Value:
    """The attention's output: the space's channels at ``positions`` (its value rows), in order."""
    whole = Value(((index, 0),), tracer.space(index).width, ndim=4)
    return tracer.with_layout(whole, [(index, channel) for channel in positions], by_position=False)


def halo_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """``HaloAttn``, a leaf: ``q`` and ``kv`` consumers of its input; ``kv``'s rows a space of ``num_heads`` blocks
    of key then value positions, ``q``'s rows points of its key positions, the position tables' columns scales of
    them; the output its value positions in order."""
    name = str(node.target)
    read(tracer, f"{name}.q", module.q, value)
    read(tracer, f"{name}.kv", module.kv, value)
    index = tracer.new_space(PrunableLayer(f"{name}.kv", module.kv))
    space, heads = tracer.space(index), module.num_heads
    key, per_head = module.dim_head_qk, module.dim_head_qk + module.dim_head_v
    output = values_out(tracer, index, [h * per_head + key + j for h in range(heads) for j in range(module.dim_head_v)])
    if reason := unhandled_variant(module, ("q", "kv"), heads * (key + per_head)) or tracer.reused(name):
        space.refuse(f"attention {name} (HaloAttn) {reason}")
        return output
    space.groups = heads
    queries = tuple(c // per_head * key + c % per_head if c % per_head < key else -1 for c in range(space.width))
    space.points.append(ChannelPoint(f"{name}.q", module.q, 0, (1, heads * key, 1, 1), at=queries))
    position_tables(tracer, index, name, (key, module.dim_head_v))
    return output


def bottleneck_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """``BottleneckAttn``, a leaf: ``qkv`` a consumer of its input and the producer of a space of ``3 · num_heads``
    blocks (every head's q, then k, then v positions), the position tables' columns scales of head 0's q positions;
    the output its v rows in order."""
    name = str(node.target)
    read(tracer, f"{name}.qkv", module.qkv, value)
    index = tracer.new_space(PrunableLayer(f"{name}.qkv", module.qkv))
    space, key = tracer.space(index), module.dim_out_qk
    output = values_out(tracer, index, list(range(2 * key, space.width)))
    reason = unhandled_variant(module, ("qkv",), 2 * key + module.dim_out_v) or tracer.reused(name)
    if reason is None and module.dim_head_qk != module.dim_head_v:
        reason = "has heads of other q/k widths than v widths, which its q, k, v rows do not cut in equal blocks"
    if reason:
        space.refuse(f"attention {name} (BottleneckAttn) {reason}")
        return output
    space.groups = 3 * module.num_heads
    position_tables(tracer, index, name, (module.dim_head_qk,))
    return output


def register() -> None:
    from timm.layers import bottleneck_attn, halo_attn

    register_module_handler(halo_attn.HaloAttn, halo_attention)
    register_module_handler(bottleneck_attn.BottleneckAttn, bottleneck_attention)
    register_split_sizes((halo_attn.HaloAttn, bottleneck_attn.BottleneckAttn), head_sizes)
    register_split_sizes((halo_attn.PosEmbedRel, bottleneck_attn.PosEmbedRel), table_width)
