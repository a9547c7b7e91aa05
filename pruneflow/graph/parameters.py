"""Who owns each parameter: a module's tensors are its own to cut only where no other op reads them."""

from __future__ import annotations

import logging
from typing import Any

import torch.fx
from torch import nn

from pruneflow.graph.layers import LAYER_NORMS, NORM_TYPES, PRODUCER_TYPES
from pruneflow.graph.nodes import describe

log = logging.getLogger(__name__)


def shared_parameters(model: nn.Module, graph: torch.fx.Graph) -> dict[str, str]:
    """Modules whose parameters are not theirs alone → why: tied to another module's (``b.weight = a.weight``)
    or read outside the module (``F.conv2d(x, self.conv.weight)``, a ``get_attr`` in the graph). Cutting
    such a module's rows or columns would leave the other reader with the old shape, or untie the two.
    Each is said once in the log."""
    owners: dict[int, list[str]] = {}
    modules = dict(model.named_modules())
    for name, _ in model.named_parameters(remove_duplicate=False):
        # one module under several names (CoaT's ``self.mlp2 = self.mlp3 = Mlp(...)``) is one owner, not a tie:
        # ``torch.fx`` calls it by its first name, and the tracer counts its calls
        if name.rpartition(".")[0] not in modules:
            continue
        owners.setdefault(id(model.get_parameter(name)), []).append(name)
    shared: dict[str, str] = {}
    for names in owners.values():
        for name in names[1:]:
            shared.setdefault(name.rpartition(".")[0], f"{name} is {names[0]} (tied parameters)")
            shared.setdefault(names[0].rpartition(".")[0], f"{names[0]} is tied to {name}")
    for node in graph.nodes:
        if node.op == "get_attr":
            readers = ", ".join(describe(user, modules) for user in node.users)
            for name in owners.get(id(attribute(model, str(node.target))), [str(node.target)]):
                shared.setdefault(name.rpartition(".")[0], f"{name} is also read by {readers}")
    for module_name, reason in shared.items():
        if isinstance(modules.get(module_name), (*PRODUCER_TYPES, *NORM_TYPES, *LAYER_NORMS)):
            log.info("channel graph: %s; its channels are not prunable", reason)
    return shared


def attribute(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part, None)
    return value
