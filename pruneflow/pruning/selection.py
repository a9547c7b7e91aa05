"""Which channel spaces to prune: every prunable one by default, or those a user's globs name (``mask.layers``),
with the attention q/k/v spaces tied to them."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence

from pruneflow.errors import ConfigError
from pruneflow.graph import ChannelSpace, PrunableLayer

log = logging.getLogger(__name__)


def _spaces_of(layers: Sequence[PrunableLayer]) -> list[ChannelSpace]:
    return list({id(layer.space): layer.space for layer in layers if layer.space is not None}.values())


def select_spaces(
    spaces: Sequence[ChannelSpace], patterns: Iterable[str] | None, groups: bool = False, heads: bool = False
) -> list[ChannelSpace]:
    """The spaces to prune: by default every prunable one (coupled ones only when ``groups``);
    with ``patterns``, those with a producer matching a glob. A glob naming one member of a group
    selects the group, and the log says so; a glob that selects nothing is a ``ConfigError``.
    With ``heads`` (``mask.heads``): every attention's q, k, v space on its own, losing whole heads, and the streams
    they are tied to left whole (their width is every head's width).
    """
    if heads:
        keys = {id(space) for space in select_spaces(spaces, patterns, groups) if not space.tied and not space.tied_to}
        keys |= {id(space) for space in spaces if space.head_rows and space.tied_to is not None and space.prunable}
        return [space for space in spaces if id(space) in keys]
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
