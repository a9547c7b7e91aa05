"""timm's HaloNet attention (``timm.layers.halo_attn.HaloAttn``), kept whole: its key, value and query rows and the
output they write are one space, cut at the same positions in every head.

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.reorderings import sizes_in
from pruneflow.graph.records import ChannelPoint, ChannelScale, PrunableLayer, SplitSizes
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

POSITION_TABLES = ("height_rel", "width_rel")


def unhandled_variant(module: nn.Module) -> str | None:
    """Why a ``HaloAttn``'s rows cannot be cut as the module docstring reads them (None: they can)."""
    heads, key, value = module.num_heads, module.dim_head_qk, module.dim_head_v
    if type(module.q) is not nn.Conv2d or type(module.kv) is not nn.Conv2d:
        return "projects with other layers than nn.Conv2d q and kv"
    if module.q.out_channels != heads * key or module.kv.out_channels != heads * (key + value):
        return f"has q/kv rows that are not {heads} heads of {key} key and {value} value positions"
    if module.q.groups != 1 or module.kv.groups != 1:
        return "projects with grouped convs"
    return None


def halo_split(module: nn.Module, sizes: tuple[int, ...] | list[int]) -> dict[str, int]:
    """The sizes a ``HaloAttn`` reshapes by, for ``sizes`` = (key, value) positions kept per head."""
    key, value = sizes
    heads = module.num_heads
    return {"dim_head_qk": key, "dim_head_v": value, "dim_out_qk": heads * key, "dim_out_v": heads * value}


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
    output = [(index, h * per_head + key + j) for h in range(heads) for j in range(module.dim_head_v)]
    if reason := unhandled_variant(module) or tracer.reused(name):
        space.refuse(f"attention {name} (HaloAttn) {reason}")
        return tracer.with_layout(Value(((index, 0),), space.width, ndim=4), output, by_position=False)
    space.groups = heads
    queries = tuple(c // per_head * key + c % per_head if c % per_head < key else -1 for c in range(space.width))
    space.points.append(ChannelPoint(f"{name}.q", module.q, 0, (1, heads * key, 1, 1), at=queries))
    first_head_keys = tuple(c if c < key else -1 for c in range(space.width))
    space.scales += [ChannelScale(f"{name}.pos_embed.{table}", 1, 0, at=first_head_keys) for table in POSITION_TABLES]
    sizes = (key, module.dim_head_v)
    space.splits += [SplitSizes(name, sizes), SplitSizes(f"{name}.pos_embed", sizes)]
    return tracer.with_layout(Value(((index, 0),), space.width, ndim=4), output, by_position=False)


def register() -> None:
    from timm.layers.halo_attn import HaloAttn, PosEmbedRel

    register_module_handler(HaloAttn, halo_attention)
    register_split_sizes(HaloAttn, halo_split)
    register_split_sizes(PosEmbedRel, lambda module, sizes: sizes_in("dim_head")(module, sizes[:1]))
