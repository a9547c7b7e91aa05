"""timm's rotary position embeddings (RoPE) as EVA's attention reads them (DINOv3's ``RotaryEmbeddingDinoV3``,
EVA-02's ``RotaryEmbeddingCat``): the q/k positions they rotate, as a space of frequencies the cut slices.

The model builds one sin/cos table from the rope's frequencies (``periods``, ``bands``: F of them) and a 2-D grid
of the patches, and hands it to every block's attention, which rotates the patch tokens' q and k in every head by it
(its prefix tokens, ``num_prefix_tokens``, are not rotated). The table's angles are laid out axis by axis, F per
axis: angle i rotates the pair of head positions (i, i + d/2) in the "rotate half" layout, (2i, 2i + 1) interleaved,
by frequency i mod F. q·k is a sum over those pairs, each rotated by its own angle (and a sum over the prefix
tokens' plain positions), so cutting the 4 positions of one frequency (its pair on each axis) from q and k of every
head, and the frequency from the table, leaves every other pair's rotation and product as they were: exact. A
pair cut on one side only would rotate a kept position into a pruned one; so the positions go by whole frequencies,
the same in every head (the table is broadcast over the heads) and in every attention the table reaches
(``RopeFrequencies``). The value positions of each head stay free; a head keeps as many of them as of q/k positions.

The cut slices the frequency buffer and every cached table (its sin and cos columns of the kept positions, which
is what the rope builds from the kept frequencies) and sets ``dim``; ``Compaction.sizes`` records the kept
frequencies, so a fresh model given them has the cut's table. A rope whose table is not one of these (the mixed
rope's learned frequencies per head and block, MRoPE's sections) is not read here: EVA's heads then go whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx
from torch import Tensor, nn

from pruneflow.graph.nodes import argument, reads_shape
from pruneflow.graph.records import RopeFrequencies
from pruneflow.graph.registry import ROPE_TABLES

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def table_owner(tracer: Tracer, table: torch.fx.Node) -> str | None:
    """The rope module whose buffers alone make the table ``table`` (shapes aside); None where it is anything else
    (values from the input, from a layer, from several modules)."""
    owners, seen, stack = set(), set(), [table]
    while stack:
        node = stack.pop()
        if node in seen or reads_shape(node):  # the grid's size, not its values
            continue
        seen.add(node)
        if node.op == "get_attr":
            owner = buffer_owner(tracer, str(node.target))
            if owner is None:
                return None
            owners.add(owner)
        elif node.op in ("placeholder", "call_module"):
            return None
        stack.extend(node.all_input_nodes)
    return owners.pop() if len(owners) == 1 else None


def buffer_owner(tracer: Tracer, target: str) -> str | None:
    """The rope module one of whose table buffers ``target`` is, or a view of (``periods[None, None, :]``, which
    ``torch.fx`` records as a constant of the traced model); None where it is no such buffer."""
    owner, _, attribute = target.rpartition(".")
    if attribute in table_buffers(tracer.modules.get(owner)):
        return owner
    constant = getattr(tracer.model, target, None) if not owner else None
    if not isinstance(constant, Tensor):
        return None
    owners = [name for name, module in tracer.modules.items()
              if any(constant is b or constant._base is b for b in table_buffers(module).values())]  # fmt: skip
    return owners[0] if len(owners) == 1 else None


def table_buffers(module: nn.Module | None) -> dict[str, Tensor]:
    """A rope's frequencies and the tables it caches (``ROPE_TABLES``), by attribute; {} for any other module."""
    frequencies, caches = ROPE_TABLES.get(type(module), ("", ()))
    buffers = {name: getattr(module, name, None) for name in (frequencies, *caches) if name}
    return {name: buffer for name, buffer in buffers.items() if isinstance(buffer, Tensor)}


def frequency_at(width: int, count: int, half: bool) -> tuple[int, ...]:
    """Head position → the frequency rotating it, for a head of ``width`` positions and a table of ``count``
    frequencies per axis: angle i (axis i // count) rotates positions (i, i + width/2) (``half``) or (2i, 2i + 1)."""
    return tuple((p % (width // 2) if half else p // 2) % count for p in range(width))


@dataclass
class RopeReads:
    """A rope table as the walk finds it: its frequencies, the q/k/v spaces cut by them, the nodes holding the table
    and the attentions reading it so (``read_rope``); anything else reading those nodes keeps the table whole."""

    table: RopeFrequencies
    inners: list[int] = field(default_factory=list)
    nodes: set[torch.fx.Node] = field(default_factory=set)
    readers: set[str] = field(default_factory=set)


def rope_frequencies(tracer: Tracer, node: torch.fx.Node, attention: nn.Module) -> RopeFrequencies | None:
    """The frequencies of the rope table EVA's attention call ``node`` is given (None: no table read here), one
    record per rope module, shared by every attention it reaches."""
    table = argument(node, 1, "rope", None)
    owner = table_owner(tracer, table) if isinstance(table, torch.fx.Node) else None
    if owner is None:
        return None
    rope = tracer.modules[owner]
    count, width = getattr(rope, ROPE_TABLES[type(rope)][0]).numel(), attention.head_dim
    half = bool(getattr(attention, "rotate_half", False))
    if rope.dim != width or width != 4 * count or half != bool(rope.rotate_half):  # a 2-D grid, one layout
        return None
    reads = tracer.ropes.setdefault(owner, RopeReads(RopeFrequencies(owner, frequency_at(width, count, half))))
    reads.nodes.add(table)
    return reads.table


def read_rope(tracer: Tracer, node: torch.fx.Node, inner: int, table: RopeFrequencies) -> None:
    """Attention call ``node``'s q/k/v space ``inner`` is cut by ``table``'s frequencies (``settle_ropes``)."""
    tracer.ropes[table.owner].inners.append(inner)
    tracer.ropes[table.owner].readers.add(node.name)


def settle_ropes(tracer: Tracer) -> None:
    """Give each rope table the q/k/v spaces of the attentions reading it, each space its table (before the ties,
    which prune their streams in whole frequencies of every head)."""
    for reads in tracer.ropes.values():
        table = reads.table
        table.spaces = list(dict.fromkeys(tracer.space(inner) for inner in reads.inners))
        for space in table.spaces:
            space.rope = table


def refuse_partly_prunable(tracer: Tracer) -> None:
    """A table is cut for every attention reading it or for none: where one of their q/k/v spaces is not prunable,
    or anything else reads the table (an attention refused or cut in whole heads, any other op), the attentions cut
    by it (and the streams they are tied to, and what else is tied to those) are refused, naming it."""
    for reads in tracer.ropes.values():
        table = reads.table
        others = [user for node in reads.nodes for user in node.users if user.name not in reads.readers]
        held = next((space.name for space in table.spaces if not space.prunable), None)
        if held is None and not others:
            continue
        reader = held or tracer.describe(others[0])
        reason = f"rope {table.owner}'s frequencies also rotate {reader}, which keeps its positions"
        for space in table.spaces:
            stream = space.tied_to
            for refused in (space, *((stream, *stream.tied) if stream is not None else ())):
                refused.refuse(reason)


def register() -> None:
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3

    ROPE_TABLES[RotaryEmbeddingDinoV3] = ("periods", ("pos_embed_cached",))
    ROPE_TABLES[RotaryEmbeddingCat] = ("bands", ("pos_embed",))
