"""The tracer's walk: capture a model with ``torch.fx``, then for each node look up the handler of its op
(``registry``) and keep what it says of the node's channels, joining spaces in one union-find.

The walk itself knows only what is common to every op: the network's inputs and outputs, the parts of a split,
the probe that follows a reshape of channels (``handlers.reorderings``), and what to do when no handler
understands an op: refuse every space that reaches it, naming the op, once in the log.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph import calls, registry, widths
from pruneflow.graph.capture import UntraceableModel, capture, first_line
from pruneflow.graph.handlers import gates, joins, multipliers, norms, reorderings, shapes, slices, timm_rope, tokens
from pruneflow.graph.layers import PRODUCER_TYPES
from pruneflow.graph.nodes import argument, describe, reads_shape
from pruneflow.graph.parameters import shared_parameters
from pruneflow.graph.records import ChannelGraph, ChannelSpace, PrunableLayer
from pruneflow.graph.routes import RouteSlots, channel_routes, split_slots, unplaceable
from pruneflow.graph.union import UnionFind
from pruneflow.graph.values import UNKNOWN, Parts, Value

log = logging.getLogger(__name__)


class Tracer:
    """One forward walk over an fx graph, building spaces with a union-find over their ids; what handlers read
    and change."""

    def __init__(
        self,
        model: nn.Module,
        graph: torch.fx.Graph,
        widths: Mapping[str, int] | None = None,
        opaque: Mapping[str, str] | None = None,
    ) -> None:
        # ``widths``: producers traced as if they had these widths (``route_slots``: how a cut network would route
        # its channels), their readers taken at whatever width reaches them
        self.widths = widths
        self.opaque = dict(opaque or {})  # submodules kept whole, torch.fx cannot trace them → why (``capture``)
        self.model = model
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.spaces: list[ChannelSpace] = []
        self.union_find: UnionFind[int] = UnionFind()
        self.values: dict[torch.fx.Node, Value | Parts | None] = {}
        self.writer_of: dict[torch.fx.Node, PrunableLayer] = {}
        self.not_understood: dict[str, set[int]] = {}
        self.concrete: dict[torch.fx.Node, Any] = {}  # shapes and shape arithmetic a reshape probe needs
        self.by_position: set[int] = set()  # spaces reordered by position (``Value.by_position``): the cut places them
        # (a space, the space it is added to, where it starts there, each channel there → the space's) (``slices``)
        self.embedded: list[tuple[int, int, int, tuple[int, ...]]] = []
        self.folded: set[int] = set()  # spaces whose producer's rows follow the spaces it joins (``handlers.folds``)
        self.chunks: list[tuple[int, int]] = []  # (a space, the equal parts it is split into) (``handlers.gates``)
        self.multiplied: list[tuple[int, int, int, str]] = []  # (read, written, k, conv) (``multipliers``)
        self.ties: list[tuple[int, int, str]] = []  # (an attention's q/k/v space, the space it reads, the attention)
        self.ropes: dict[str, timm_rope.RopeReads] = {}  # rope module → its table, and what reads it
        # (a space, the spaces of the tensor whose positions it has: an LSTM's units, its input's) (``recurrent``)
        self.same_positions: list[tuple[int, frozenset[int]]] = []
        # shapes read from channel values (node → (value, dim; None: all)), and the nodes that are channel widths
        # (node → space ids): a width that sizes another tensor refuses its spaces (``widths``)
        self.shape_reads: dict[torch.fx.Node, tuple[Value, int | None]] = {}
        self.width_reads: dict[torch.fx.Node, set[int]] = {}
        self.sized_by_width: list[tuple[torch.fx.Node, set[int], list[int]]] = []  # (op, widths' spaces, its tensor's)
        self.calls: dict[str, int] = {}
        # a module called more than once: its first call's (inputs, output), and those whose calls read different
        # spaces (``repeated_call``)
        self.first_calls: dict[str, tuple[tuple[Any, ...], Any]] = {}
        self.mixed_calls: set[str] = set()
        self.attribute_reads: dict[str, int] = {}  # get_attr target → how many ops read it
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
            if node.op == "get_attr":
                self.attribute_reads[str(node.target)] = self.attribute_reads.get(str(node.target), 0) + len(node.users)
        self.shared = shared_parameters(model, graph)

    # widths and ownership
    def width(self, layer: PrunableLayer) -> int:
        return layer.num_channels if self.widths is None else self.widths.get(layer.name, layer.num_channels)

    def fits(self, value_width: int | None, module_width: int) -> bool:
        """Whether a reader of ``module_width`` channels reads a value of ``value_width`` (any, at ``widths``)."""
        return value_width == module_width or (self.widths is not None and value_width is not None)

    def reused(self, name: str) -> str | None:
        """Why module ``name``'s tensors are not its own to cut (called on different spaces, a parameter used
        elsewhere)."""
        if name in self.mixed_calls:
            return f"{name} is called {self.calls[name]} times on different channel spaces"
        return self.shared.get(name)

    def describe(self, node: torch.fx.Node) -> str:
        return describe(node, self.modules)

    # the union of spaces
    def space(self, index: int) -> ChannelSpace:
        return self.spaces[self.union_find.root(index)]

    def new_space(self, layer: PrunableLayer) -> int:
        self.spaces.append(ChannelSpace(self.width(layer), [layer]))
        return self.union_find.add(len(self.spaces) - 1)

    def union(self, a: int, b: int, where: str) -> int:
        first, second = self.union_find.union(a, b)
        if second is None:
            return first
        kept, merged = self.spaces[first], self.spaces[second]
        kept.producers += merged.producers
        kept.consumers += merged.consumers
        kept.points += merged.points
        kept.scales += merged.scales
        kept.sources += merged.sources
        kept.held_by += [held for held in merged.held_by if held not in kept.held_by]
        kept.splits += merged.splits
        kept.groups = self.joined_groups(kept, merged.groups, where)
        kept.block = math.lcm(kept.block, merged.block)  # whole blocks of both norms' groups
        kept.refusals += [reason for reason in merged.refusals if reason not in kept.refusals]
        kept.coupled = True
        if kept.width != merged.width:
            kept.refuse(f"{where} joins {kept.width} with {merged.width} channels")
        return first

    @staticmethod
    def joined_groups(space: ChannelSpace, groups: int, where: str) -> int:
        if groups == 1 or space.groups in (1, groups) or space.width % math.lcm(space.groups, groups) == 0:
            return math.lcm(space.groups, groups)  # the same positions in each of the finer blocks: in both's
        space.refuse(f"{where} joins a space cut in {space.groups} groups with one cut in {groups}")
        return space.groups

    def refuse(self, value: Value | Parts | None, reason: str, first: bool = False) -> None:
        """Refuse every space ``value`` carries, for ``reason`` (``first``: its first reason)."""
        for part in value.parts if isinstance(value, Parts) else (value,):
            for index, _ in part.segments if part is not None else ():
                self.space(index).refuse(reason, first)

    def refuse_unknown(self, node: torch.fx.Node, values: Iterable[Value | Parts | None]) -> None:
        """Refuse every space reaching ``node``, an op whose effect on channels is not understood."""
        description = self.describe(node)
        for value in values:
            for part in value.parts if isinstance(value, Parts) else (value,):
                if part is not None:
                    self.refuse(part, f"reaches {description}, whose effect on channels is not understood")
                    self.not_understood.setdefault(description, set()).update(i for i, _ in part.segments)

    # opaque leaves: submodules kept whole because torch.fx cannot trace their forward
    def kept_whole(self, node: torch.fx.Node) -> str:
        why = self.opaque[str(node.target)]
        return f"{self.describe(node)} is kept whole: torch.fx cannot trace its forward ({why})"

    def refuse_all(self, values: Iterable[Value | Parts | None], reason: str, first: bool = False) -> None:
        for value in values:
            self.refuse(value, reason, first)

    def refuse_meeting_opaque(self) -> None:
        """Refuse every space an opaque leaf's output meets on its way (added into a stream, concatenated with it):
        what it writes is unknown, so a space it joins is refused naming it, not only the join."""
        for node in self.graph.nodes:
            if node.op != "call_module" or str(node.target) not in self.opaque:
                continue
            reason, seen, frontier = self.kept_whole(node), {node}, list(node.users)
            while frontier:
                user = frontier.pop()
                if user in seen or reads_shape(user):  # its shape sizes nothing of the spaces' channels
                    continue
                seen.add(user)
                self.refuse_all(self.input_values(user), reason, first=True)  # the join's refusal follows from it
                if self.values.get(user) is None:  # still carrying what the leaf wrote, unknown channels
                    frontier.extend(user.users)

    # inputs
    def input_values(self, node: torch.fx.Node) -> list[Value | Parts | None]:
        nodes: list[torch.fx.Node] = []
        torch.fx.map_arg((node.args, node.kwargs), lambda n: nodes.append(n))
        return [self.values.get(n) for n in nodes]

    def first(self, node: torch.fx.Node) -> Value | Parts | None:
        arg = node.args[0] if node.args else None
        return self.values.get(arg) if isinstance(arg, torch.fx.Node) else None

    # layouts: channels position by position
    def layout_of(self, value: Value) -> tuple[tuple[int, int], ...] | None:
        """``value``'s channels position by position, (space id, channel); None where part of it is unknown."""
        if value.layout is not None:
            return value.layout
        if value.width is None or value.flattened:
            return None
        positions: list[tuple[int, int] | None] = [None] * value.width
        for index, offset in value.segments:
            for channel in range(self.space(index).width):
                positions[offset + channel] = (index, channel)
        return None if None in positions else tuple(positions)  # type: ignore[return-value]

    def with_layout(
        self, value: Value, layout: Sequence[tuple[int, int]], by_position: bool = True, **changes: Any
    ) -> Value:
        """``value`` carrying ``layout``: as segments where it is whole spaces in order, else position by position
        (``by_position``: placed so at any width, a shuffle's; else the parts of splits whose sizes the cut sets)."""
        segments: list[tuple[int, int]] = []
        position = 0
        while position < len(layout):
            index, channel = layout[position]
            width = self.space(index).width
            run = tuple((index, c) for c in range(width))
            if channel != 0 or tuple(layout[position : position + width]) != run:
                break
            segments.append((index, position))
            position += width
        if position == len(layout):
            return replace(value, segments=tuple(segments), width=len(layout), layout=None, probe=None,
                           by_position=False, **changes)  # fmt: skip
        spaces = tuple((index, -1) for index in dict.fromkeys(index for index, _ in layout))
        if by_position:
            self.by_position.update(index for index, _ in spaces)
        return replace(value, segments=spaces, width=len(layout), layout=tuple(layout), probe=None,
                       by_position=by_position, **changes)  # fmt: skip

    def positions(self, layout: tuple[tuple[int, int], ...]) -> dict[int, tuple[int, ...]]:
        """Space id → for each of its channels, where the layout places it (-1: not in it)."""
        at: dict[int, list[int]] = {}
        for position, (index, channel) in enumerate(layout):
            at.setdefault(index, [-1] * self.space(index).width)[channel] = position
        return {index: tuple(entries) for index, entries in at.items()}

    # the walk
    def run(self) -> ChannelGraph:
        for node in self.graph.nodes:
            self.values[node] = self.visit_or_refuse(node)
        self.refuse_meeting_opaque()
        widths.refuse_foreign_widths(self)
        for description, indices in self.not_understood.items():
            names = sorted({self.space(i).name for i in indices})
            log.info("channel graph: %s is not understood; not prunable: %s", description, ", ".join(names))
        gates.settle_chunks(self)
        slices.embed_spaces(self)
        multipliers.expand_spaces(self)
        roots = [i for i in range(len(self.spaces)) if self.union_find.is_root(i) and i not in self.folded]
        spaces = [self.spaces[index] for index in roots]
        by_position = {self.union_find.root(index) for index in self.by_position}
        for index, space in zip(roots, spaces, strict=True):
            space.consumers = list(dict.fromkeys(space.consumers))
            space.reordered = index in by_position
            if space.reordered:  # the cut keeps the network's split sizes there, and places the channels
                space.splits = []
            # split, and cut at the same positions in each of its groups: every part keeps its share without routes
            space.routes = channel_routes(space) if space.reordered or (space.splits and space.groups == 1) else {}
            reason = unplaceable(space) if space.reordered else None
            if reason:
                space.refuse(reason)
            if space.splits and space.routes:
                space.route_slots = functools.partial(split_slots, space)
            for layer in space.producers:
                layer.space = space
        timm_rope.settle_ropes(self)
        self.tie()
        timm_rope.refuse_partly_prunable(self)
        tokens.refuse_shared_sources(spaces)
        joins.refuse_shared_scales(spaces)
        norms.refuse_mixed_blocks(spaces)
        graph = ChannelGraph(spaces)
        if self.widths is None and any(space.reordered and space.routes for space in spaces):
            slots = RouteSlots(self.model, graph, trace_channel_graph)
            for space in spaces:
                if space.reordered and space.routes:
                    space.route_slots = functools.partial(slots.of, space.name)
        return graph

    def tie(self) -> None:
        """Tie each attention's q/k/v space to the space it reads: pruned together or not at all."""
        for inner, read, _ in self.ties:
            attention, anchor = self.space(inner), self.space(read)
            attention.tied_to = anchor
            anchor.tied.append(attention)
            # whole heads: the stream loses one head's width per head; else as many channels from every head (whole
            # frequencies of a rope's: ``RopeFrequencies``)
            unit = anchor.width // attention.heads if attention.whole_heads else attention.heads
            unit *= attention.rope.positions if attention.rope is not None else 1
            anchor.multiple = math.lcm(anchor.multiple, unit)
        for _ in range(2):  # a refusal on either side refuses the other
            for inner, read, name in self.ties:
                attention, anchor = self.space(inner), self.space(read)
                if attention.prunable and not anchor.prunable:
                    attention.refuse(f"attention {name}'s head width follows {anchor.name}, which is not prunable")
                if anchor.prunable and not attention.prunable:
                    anchor.refuse(f"attention {name}'s head width follows it, and its q, k, v rows are not prunable")
                if anchor.width % anchor.multiple:
                    anchor.refuse(f"its {anchor.width} channels are not a multiple of attention {name}'s heads")

    def visit_or_refuse(self, node: torch.fx.Node) -> Value | Parts | None:
        """``visit``, except that a rule that raises (a model no rule foresaw, a user's handler) refuses what
        reaches the op, naming it: the graph refuses what it cannot follow, it never fails a trace."""
        try:
            return self.visit(node)
        except Exception as exc:  # any rule's failure is this op's refusal
            reason = f"{self.describe(node)} could not be followed ({type(exc).__name__}: {first_line(exc)})"
            log.info("channel graph: %s", reason)
            for value in self.input_values(node):
                self.refuse(value, reason)
            return None

    def visit(self, node: torch.fx.Node) -> Value | Parts | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for value in self.input_values(node):
                self.refuse(value, "reaches the network's output, whose shape would change")
            return None
        widths.follow(self, node)
        if node.op == "call_module" and str(node.target) in self.opaque:
            self.refuse_all(self.input_values(node), self.kept_whole(node))
            return None
        if shapes.shape_arithmetic(self, node):
            return None
        value, values = self.first(node), self.input_values(node)
        if isinstance(value, Parts) and node.target is operator.getitem and isinstance(node.args[1], int):
            return value.parts[node.args[1]]
        if isinstance(value, Value) and value.probe is not None:
            if reorderings.reshaping(node):
                return reorderings.probed(self, node, value)
            if node.target == "size" or (node.target is getattr and node.args[1:2] == ("shape",)):
                dim = argument(node, 1, "dim", None) if node.target == "size" else None
                shapes.record_shape(self, node, value, dim)
                return None
        if any(isinstance(v, Parts) or (v is not None and v.probe is not None) for v in values):
            self.refuse_unknown(node, values)  # a split's tuple read whole, a reshape mid-way read by a computation
            return None
        result = self.dispatch(node, value)
        if result is not UNKNOWN:
            return result
        if value is not None and reorderings.reshaping(node):
            return reorderings.probed(self, node, value)
        if any(v is not None for v in values):
            self.refuse_unknown(node, values)
        return None

    def dispatch(self, node: torch.fx.Node, value: Value | None) -> Any:
        """What the op's handlers say of its output; ``UNKNOWN`` if none understands it."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            repeated = calls.repeated_call(self, node, module)
            if repeated is not UNKNOWN:
                return repeated
            result = next((r for h in registry.module_handlers(type(module)) if (r := h(self, node, module, value))
                           is not UNKNOWN), UNKNOWN)  # fmt: skip
            if self.calls[str(node.target)] > 1 and str(node.target) not in self.first_calls:
                self.first_calls[str(node.target)] = (tuple(self.input_values(node)), result)
            return result
        if node.op == "call_function":
            handler = registry.function_handler(node.target)
        elif node.op == "call_method":
            handler = registry.METHOD_HANDLERS.get(str(node.target))
        else:
            handler = None
        return UNKNOWN if handler is None else handler(self, node, value)


def trace_channel_graph(model: nn.Module, widths: Mapping[str, int] | None = None) -> ChannelGraph:
    """The channel spaces of ``model``, traced once with ``torch.fx``.

    A submodule whose forward ``torch.fx`` cannot trace (control flow on a shape or a value) is kept whole
    (``capture``), and every space it reads or meets is refused, naming it. A model whose own forward cannot be
    traced gets one space per conv and linear layer, each refused: without a graph, who reads a channel is unknown.
    """
    try:
        captured = capture(model)
    except UntraceableModel as exc:  # control flow in the model's own forward, outside every submodule
        reason = f"torch.fx cannot trace {type(model).__name__} ({exc})"
        log.warning("channel graph: %s; nothing in it is prunable", reason)
        spaces = []
        for name, module in model.named_modules():
            if isinstance(module, PRODUCER_TYPES):
                layer = PrunableLayer(name, module)
                space = ChannelSpace(layer.num_channels, [layer], refusals=[reason])
                layer.space = space
                spaces.append(space)
        return ChannelGraph(spaces)
    return Tracer(model, captured.graph, widths, captured.opaque).run()


def find_prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every producer (conv, depthwise conv, linear) of a prunable space of ``model``, with its norm,
    channel point and space."""
    return [layer for space in trace_channel_graph(model).prunable for layer in space.producers]
