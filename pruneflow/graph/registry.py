"""The tables of op handlers the tracer dispatches to, and the public way to extend them.

A handler says what one op does to the channels of the tensors it reads: it returns the ``Value`` of the op's
output (which spaces its channels carry, where), ``Parts`` for a split, None for a tensor that carries no channel
space, or ``UNKNOWN`` when it does not understand this call, letting the next handler try. Module handlers are
keyed by type and found along the module's MRO (the nearest base class with a handler first, then the next one
if it answers ``UNKNOWN``); function handlers by the function object; method handlers by the method's name.

    def handler(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> ...  # a module
    def handler(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> ...  # a function or a method

``value`` is what the op's first tensor argument carries; ``tracer.input_values(node)`` gives all of them. A
module type with a handler is kept whole by ``torch.fx`` (a leaf; exact type, since a subclass may have another
forward), so its handler sees one call, not its insides. ``pruneflow.graph.leaves.register_leaf`` builds such
a handler from a short declaration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer
    from pruneflow.graph.values import Value

ModuleHandler = Callable[["Tracer", torch.fx.Node, nn.Module, "Value | None"], Any]
OpHandler = Callable[["Tracer", torch.fx.Node, "Value | None"], Any]
LeafTest = Callable[[nn.Module], bool]
RowsMaskedForward = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor], torch.Tensor]
# The attributes of a module that give a split of its input the part sizes ``sizes`` (FasterNet's ``dim_conv3`` and
# ``dim_untouched``); a ``ValueError`` saying why where no setting of them does
SplitResize = Callable[[nn.Module, Sequence[int]], dict[str, int] | dict[str, tuple[int, ...]]]

MODULE_HANDLERS: dict[type[nn.Module], ModuleHandler] = {}
FUNCTION_HANDLERS: dict[Callable[..., Any], OpHandler] = {}
METHOD_HANDLERS: dict[str, OpHandler] = {}
# Module types ``torch.fx`` keeps whole (exact types) → which instances: an attention only as torchvision builds it
LEAVES: dict[type[nn.Module], LeafTest] = {}
# Attentions whose q/k/v rows are complete only inside them (``PrunableLayer.unit``: they read ``qkv.weight``
# themselves) → their forward (on the call's arguments and keywords) with those rows' weights and biases multiplied
# by a keep-vector, which the ``activation`` strategy computes in their place (torchvision's Swin attention has its
# own, in the strategy)
ROWS_MASKED_FORWARDS: dict[type[nn.Module], RowsMaskedForward] = {}
# Module types whose own forward splits its input's channels by sizes its attributes hold (exact types) → how to set
# them: such a split cuts each part on its own (``handlers.reorderings``), and the cut sets the sizes it keeps
SPLIT_SIZES: dict[type[nn.Module], SplitResize] = {}
# Rotary position embeddings (exact types) → (the attribute holding their frequencies, the attributes caching the
# sin/cos table built from them): a table the cut slices (``handlers.timm_rope``)
ROPE_TABLES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {}
# Functions ``torch.fx`` records as one op wherever the model calls them (``stochastic_depth``), not traced into
AUTOWRAP_FUNCTIONS: list[Callable[..., Any]] = []


def _always(module: nn.Module) -> bool:
    return True


def register_module_handler(
    module_types: type[nn.Module] | tuple[type[nn.Module], ...], handler: ModuleHandler, leaf: bool | LeafTest = True
) -> ModuleHandler:
    """Teach the graph what calls of ``module_types`` (and of subclasses without a handler of their own) do to
    channels. ``leaf``: keep instances of exactly these types whole when tracing (True), not (False, the module is
    traced into where ``torch.fx`` would trace into it), or only those a test accepts."""
    for module_type in module_types if isinstance(module_types, tuple) else (module_types,):
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_module_handler needs nn.Module subclasses, not {module_type!r}")
        MODULE_HANDLERS[module_type] = handler
        if leaf:
            LEAVES[module_type] = _always if leaf is True else leaf
    return handler


def register_function_handler(
    functions: Callable[..., Any] | tuple[Callable[..., Any], ...], handler: OpHandler, autowrap: bool = False
) -> OpHandler:
    """Teach the graph what calls of ``functions`` do to channels; ``autowrap``: record each call as one op
    (``torch.fx``'s ``autowrap_functions``) instead of tracing into it, for a function with control flow."""
    for function in functions if isinstance(functions, tuple) else (functions,):
        FUNCTION_HANDLERS[function] = handler
        if autowrap and function not in AUTOWRAP_FUNCTIONS:
            AUTOWRAP_FUNCTIONS.append(function)
    return handler


def register_method_handler(methods: str | tuple[str, ...], handler: OpHandler) -> OpHandler:
    """Teach the graph what the tensor methods named ``methods`` (``"relu"``, ``"view"``) do to channels."""
    for method in (methods,) if isinstance(methods, str) else methods:
        METHOD_HANDLERS[method] = handler
    return handler


def register_split_sizes(
    module_types: type[nn.Module] | tuple[type[nn.Module], ...], resize: SplitResize
) -> SplitResize:
    """Teach the graph that ``module_types``' forward splits its input's channels by constant sizes held in its
    attributes, and ``resize(module, sizes)`` the attributes that make it split into parts of ``sizes`` (raising
    ``ValueError`` where none do): each part is then pruned on its own, and the cut sets the sizes."""
    for module_type in module_types if isinstance(module_types, tuple) else (module_types,):
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_split_sizes needs nn.Module subclasses, not {module_type!r}")
        SPLIT_SIZES[module_type] = resize
    return resize


def module_rule(rule: OpHandler) -> ModuleHandler:
    """A function or method handler used for a module whose parameters play no part (an activation, a pooling)."""
    return lambda tracer, node, module, value: rule(tracer, node, value)


def module_handlers(module_type: type[nn.Module]) -> Iterator[ModuleHandler]:
    """The handlers for ``module_type``, nearest base class first."""
    for cls in module_type.__mro__:
        handler = MODULE_HANDLERS.get(cls)
        if handler is not None:
            yield handler


def function_handler(function: Any) -> OpHandler | None:
    try:
        return FUNCTION_HANDLERS.get(function)
    except TypeError:  # an unhashable callable: no handler can be keyed by it
        return None


def is_leaf(module: nn.Module) -> bool:
    """Whether the graph keeps ``module`` whole when tracing (its handler reads the call, not the insides)."""
    test = LEAVES.get(type(module))
    return test is not None and test(module)
