"""Modules called more than once in a forward (CoaT's MLP shared by its parallel streams): a later call reading
what the first call read is that call again, pruned once; a module with tensors of its own called on different
spaces fits no cut of either, so every space it reads or writes is refused."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.layers import is_layer_norm
from pruneflow.graph.values import UNKNOWN, Parts, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def owns_tensors(module: nn.Module) -> bool:
    """Whether a cut changes ``module`` (its parameters, buffers or a norm's width), so all its calls must agree."""
    return is_layer_norm(module) or any(True for _ in (*module.parameters(), *module.buffers()))


def repeated_call(tracer: Tracer, node: torch.fx.Node, module: nn.Module) -> Any:
    """A later call of a module called more than once: reading what its first call read, it computes the same
    channels, so it is that call again (its readers and rows already recorded); reading other spaces, no cut of
    its tensors fits both, so every space it reads or writes is refused (``reused``), and this call goes to its
    handlers (``UNKNOWN``). A module without tensors of its own (an activation) is only followed again."""
    name = str(node.target)
    first = tracer.first_calls.get(name)
    if first is None:
        return UNKNOWN
    inputs, output = first
    if name not in tracer.mixed_calls and signature(tracer, tracer.input_values(node)) == signature(tracer, inputs):
        return output
    if name not in tracer.mixed_calls and owns_tensors(module):
        tracer.mixed_calls.add(name)
        for value in (*inputs, output):
            if isinstance(value, (Value, Parts)):
                tracer.refuse(value, tracer.reused(name))
    return UNKNOWN


def signature(tracer: Tracer, values: Iterable[Value | Parts | None]) -> tuple[Any, ...]:
    """``values`` with each space named by its union's root now (a residual may have joined two spaces since
    the first call): equal for two calls reading the same spaces."""
    def named(value: Value | Parts | None) -> Any:
        if not isinstance(value, Value):
            return value
        segments = tuple((tracer.union_find.root(index), offset) for index, offset in value.segments)
        layout = value.layout and tuple((tracer.union_find.root(index), c) for index, c in value.layout)
        return replace(value, segments=segments, layout=layout, probe=None)

    return tuple(named(value) for value in values)
