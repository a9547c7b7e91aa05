"""How a model becomes the fx graph the tracer walks: ``torch.fx`` symbolic tracing with the registered leaves
kept whole (``registry.LEAVES``, timm's own ``register_notrace_module`` list among them) and the registered
functions recorded as one op (``registry.AUTOWRAP_FUNCTIONS``), and where a submodule's forward still cannot be
traced (control flow on a shape or a value, ``int(proxy)``, ``len(proxy)``), that submodule kept whole too, an
**opaque leaf**: the trace is retried with it as a leaf until it succeeds, so only the spaces that meet an opaque
leaf are refused, never the whole model. Only a failure in the model's own forward, outside every submodule,
leaves nothing to keep whole; the caller refuses the model then.

Why ``torch.fx`` and not ``torch.export`` / ``make_fx`` (concrete shapes, no control-flow failures): they trace
down to ATen ops with parameters as inputs, so no module stays whole. Every rule of the graph is keyed by module
type (a conv is a producer, timm's ``Attention`` a head space), and a cut rebuilds modules, not ATen calls; the
handlers would be rewritten for ATen, and a leaf the user registers (``register_leaf``) could not be honoured.
Measured figures: ``docs/CHANNEL_GRAPH.md``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph import registry
from pruneflow.graph.handlers import timm_layers
from pruneflow.graph.registry import LeafTest

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """A model's fx graph, and its opaque leaves: the submodules kept whole because ``torch.fx`` cannot trace
    their forward (qualified name → the trace's failure, one line)."""

    graph: torch.fx.Graph
    opaque: dict[str, str] = field(default_factory=dict)


class UntraceableModel(Exception):
    """The model's own forward, outside every submodule, cannot be traced: nothing can be kept whole instead."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters; its type where it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


class _LeafTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer keeping whole the modules the graph has a handler for (``registry.LEAVES``:
    torchvision's ``LayerNorm2d`` would otherwise be traced into, its weight read by ``get_attr`` outside it) and
    the opaque leaves found so far; it remembers which submodule's forward the trace failed in."""

    def __init__(self, opaque: dict[str, str], leaves: LeafTest, functions: Sequence[Callable[..., Any]]) -> None:
        super().__init__(autowrap_functions=tuple(functions))
        self.opaque = opaque
        self.leaves = leaves
        self.failed_in: str | None = None  # the innermost submodule whose forward the trace failed in

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        whole = qualified_name in self.opaque or self.leaves(module)
        return whole or super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            name = self.path_of_module(module)
        except NameError:  # a module outside the model's tree: traced into, as ``torch.fx`` does
            return super().call_module(module, forward, args, kwargs)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost: the first to see the exception on its way out
                self.failed_in = name
            raise


def optional_arguments(model: nn.Module) -> dict[str, Any]:
    """The model's forward arguments after its input with a default of None or a plain constant, traced at it:
    what a call with the input alone runs (Hiera's ``mask=None``, a ViT's ``attn_mask=None, is_causal=False``); a
    proxy there would take the branch of a given mask, or fail on ``None or is_causal``."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: every argument a proxy
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    constant = (type(None), bool, int, float, str)
    return {p.name: p.default for p in parameters if p.kind in kinds and type(p.default) in constant}


def capture(
    model: nn.Module,
    leaves: LeafTest | None = None,
    functions: Sequence[Callable[..., Any]] | None = None,
    fallback: bool = True,
) -> Capture:
    """``model``'s fx graph, with the registered leaves whole, the registered functions one op each, and each
    submodule whose forward ``torch.fx`` cannot trace whole (an opaque leaf). Raises ``UntraceableModel`` where
    the model's own forward cannot be traced. ``leaves``, ``functions`` (default: the registry's) and ``fallback``
    (False: no opaque leaf, a failure anywhere refuses the model) are there to measure each part's reach."""
    timm_layers.register_if_imported()
    leaves = registry.is_leaf if leaves is None else leaves
    functions = registry.AUTOWRAP_FUNCTIONS if functions is None else functions
    opaque: dict[str, str] = {}
    while True:
        tracer = _LeafTracer(opaque, leaves, functions)
        try:
            return Capture(tracer.trace(model, concrete_args=optional_arguments(model)), opaque)
        except Exception as exc:  # control flow on a proxy, or anything else a forward does with one
            failed_in = tracer.failed_in
            # retrying with an opaque module whole cannot fail in it again: a failure there is not one to isolate
            if not fallback or failed_in is None or failed_in in opaque:
                raise UntraceableModel(first_line(exc)) from exc
            opaque[failed_in] = f"{type(exc).__name__}: {first_line(exc)}"
            log.info("channel graph: %s is kept whole: torch.fx cannot trace its forward (%s)", failed_in,
                     opaque[failed_in])  # fmt: skip
