"""The cut of a rotary position embedding's table (``ChannelSpace.rope``, ``graph.handlers.timm_rope``): the
frequencies whose q/k positions every attention reading the table keeps, and the rope module cut to them.

The rope's frequencies lose the cut ones and every sin/cos table it caches loses their columns (the table is sin then
cos, each laid out position by position as the attention's heads are), so the table it builds or returns is the one
it would build from the kept frequencies; its ``dim`` is the cut head width. The kept frequencies are recorded in
``Compaction.sizes`` (``{"frequencies": (...)}``): ``cut_rope_table`` on a fresh model's rope gives the same table.

The attentions reading it keep their fused path (``scaled_dot_product_attention``, which divides the logits by
√(head width) read from q's shape): the cut folds the full width's scale into their q rows (``fold_scales``) instead
of turning that path off, so the cut network runs the attention as the original does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def fold_scales(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, dict[str, Any]]:
    """Fold each cut attention's logits' scale into its q rows (``ChannelSpace.scaled_by_cut``): its fused path
    divides q·k by √(cut head width), its unfused one multiplies by its ``scale``; q rows (and ``q_bias``) times
    √(cut / full width), and ``scale`` over that factor, make both the masked network's q·k / √(full width). The
    attributes to set on each attention (its ``scale``), by name."""
    scales: dict[str, dict[str, Any]] = {}
    for group in groups:
        owner = group.space.scaled_by_cut
        if owner is None or not len(group.removed):
            continue
        attention, heads = model.get_submodule(owner), group.space.heads
        width = len(group.kept) // (3 * heads)
        factor = math.sqrt(width / (group.width // (3 * heads)))
        with torch.no_grad():
            attention.qkv.weight[: heads * width] *= factor  # q rows first, then k, then v
            if getattr(attention, "q_bias", None) is not None:
                attention.q_bias *= factor
            elif attention.qkv.bias is not None:  # q's bias inside qkv's (DaViT's window attention)
                attention.qkv.bias[: heads * width] *= factor
        scales[owner] = {"scale": attention.scale / factor}
    return scales
