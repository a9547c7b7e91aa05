"""The cut of a rotary position embedding's table (``ChannelSpace.rope``, ``graph.handlers.timm_rope``): the
frequencies whose q/k positions every attention reading the table keeps, and the rope module cut to them.

The rope's frequencies lose the cut ones and every sin/cos table it caches loses their columns (the table is sin then
cos, each laid out position by position as the attention's heads are), so the table it builds or returns is the one
it would build from the kept frequencies; its ``dim`` is the cut head width. The kept frequencies are recorded in
``Compaction.sizes`` (``{"frequencies": (...)}``): ``cut_rope_table`` on a fresh model's rope gives the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pruneflow.graph.handlers.timm_rope import frequency_at
from pruneflow.graph.registry import ROPE_TABLES

if TYPE_CHECKING:
    from pruneflow.compaction.cut import ChannelGroup


def kept_frequencies(groups: Sequence[ChannelGroup]) -> dict[str, tuple[int, ...]]:
    """Rope module → the frequencies its readers keep, for each table a cut takes frequencies from. Raises
    ``ValueError`` naming the attention where a reader keeps part of a frequency, or other ones than another."""
    kept: dict[str, tuple[int, ...]] = {}
    readers: dict[str, str] = {}
    counts: dict[str, int] = {}
    for group in groups:
        rope = group.space.rope
        if rope is None:
            continue
        keep = torch.ones(group.width, dtype=torch.bool)
        keep[group.removed] = False
        query_key = keep.view(3, group.space.heads, -1)[:2].reshape(-1, len(rope.at))
        at = torch.tensor(rope.at)
        frequencies = tuple(f for f in range(rope.count) if query_key[:, at == f].all())
        whole = torch.isin(at, torch.tensor(frequencies, dtype=at.dtype)).expand_as(query_key)
        if not torch.equal(query_key, whole):
            raise ValueError(f"{group.space.name} keeps part of a frequency of rope {rope.owner} in a head (its q/k "
                             "positions go by whole frequencies, the same in q and k of every head)")  # fmt: skip
        if kept.setdefault(rope.owner, frequencies) != frequencies:
            raise ValueError(f"{group.space.name} keeps other frequencies of rope {rope.owner} than "
                             f"{readers[rope.owner]}, which reads the same table")  # fmt: skip
        readers.setdefault(rope.owner, group.space.name)
        counts[rope.owner] = rope.count
    return {owner: frequencies for owner, frequencies in kept.items() if len(frequencies) < counts[owner]}


def cut_rope_table(rope: nn.Module, frequencies: Sequence[int]) -> None:
    """Keep ``frequencies`` of ``rope``'s table (indices into its full table) in place: its frequency buffer, the
    columns of every cached sin/cos table and its ``dim``."""
    attribute, caches = ROPE_TABLES[type(rope)]
    full: Tensor = getattr(rope, attribute)
    count = full.numel()
    at = torch.tensor(frequency_at(4 * count, count, bool(rope.rotate_half)))
    index = torch.tensor(list(frequencies), dtype=torch.long)
    positions = torch.isin(at, index).nonzero().flatten()
    setattr(rope, attribute, full.index_select(0, index.to(full.device)).clone())
    for cache in caches:
        table = getattr(rope, cache, None)
        if isinstance(table, Tensor):  # (positions, sin then cos of every head position)
            columns = torch.cat([positions, positions + 4 * count]).to(table.device)
            setattr(rope, cache, table.index_select(-1, columns).clone())
    rope.dim = 4 * len(index)
