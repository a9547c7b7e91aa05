"""Routes and slots of reordered spaces: where a channel shuffle or a ``chunk`` sends each channel (its **route**,
the modules that read it), and how many channels each route can carry in a network cut to a smaller width (its
**slots**), which the criteria keep to and the cut places channels on."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

from torch import nn

from pruneflow.graph.records import ChannelGraph, ChannelSpace

Trace = Callable[[nn.Module, Mapping[str, int]], ChannelGraph]


def channels_to_prune(num_channels: int, amount: float) -> int:
    """How many of ``num_channels`` output channels ``amount`` removes: ⌊amount·C⌋, never all of them."""
    return min(int(amount * num_channels + 1e-9), num_channels - 1)


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


def split_slots(space: ChannelSpace, amount: float) -> dict[tuple[str, ...], int]:
    """Slots per route of a space split by sizes the cut sets (``ChannelSpace.splits``): the kept channels shared out
    in proportion to the routes' widths, earlier routes taking the odd ones (a split in halves by ``C // 2`` needs
    the first part no smaller), at least one each (a part cut to nothing would leave its reader no input)."""
    kept = space.width - channels_to_prune(space.width, amount)
    routes = sorted(space.routes.items(), key=lambda item: item[1][0])
    slots, given, seen = {}, 0, 0
    for route, channels in routes:
        seen += len(channels)
        share = max(1, -(-kept * seen // space.width) - given)
        slots[route], given = min(share, len(channels)), given + share
    return slots


REORDERED = "(a split or a shuffle)"


def unplaceable(space: ChannelSpace) -> str | None:
    """Why a cut could not place a reordered space's kept channels on its routes (the cut's own checks, said in the
    graph so that the space is refused before training, not after the pruning); None where it can."""
    if not space.routes:
        return None
    if space.groups > 1:  # a cut places reordered channels freely, a group's rows in place
        return f"it is written or read in {space.groups} groups and reordered on its way (a shuffle)"
    if space.scales:
        return f"it is reordered on its way {REORDERED} and scaled by a per-channel parameter the cut does not place"
    if any(consumer.features_per_channel != 1 for consumer in space.consumers):
        return f"it is reordered on its way {REORDERED} and read flattened, which the cut does not place"
    return None


def route_slots(
    model: nn.Module, graph: ChannelGraph, amount: float, trace: Trace
) -> dict[str, dict[tuple[str, ...], int]]:
    """Slots per route of each reordered space (``ChannelSpace.routes``) in ``model`` cut with ``amount`` of every
    reordered space pruned, found by tracing ``model`` at those widths: what ``Criterion.select`` keeps per route."""
    widths = {
        name: space.width - channels_to_prune(space.width, amount)
        for space in graph.spaces
        if space.reordered
        for name in space.names
    }
    reordered = {space.name for space in graph.spaces if space.reordered}
    return {
        space.name: {route: len(channels) for route, channels in channel_routes(space).items()}
        for space in trace(model, widths).spaces
        if space.name in reordered
    }


class RouteSlots:
    """How many slots each route of a reordered space has in the network cut to a pruned share of every
    reordered space: traced once per share (``route_slots``), the model held weakly."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, trace: Trace) -> None:
        self.model = weakref.ref(model)
        self.graph = graph
        self.trace = trace
        self.cache: dict[float, dict[str, dict[tuple[str, ...], int]]] = {}

    def of(self, name: str, amount: float) -> dict[tuple[str, ...], int]:
        if amount not in self.cache:
            model = self.model()
            self.cache[amount] = {} if model is None else route_slots(model, self.graph, amount, self.trace)
        return self.cache[amount].get(name, {})
