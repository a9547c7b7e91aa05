"""Reading ``torch.fx`` nodes: an op's arguments, and its name in the log and in refusals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx
from torch import nn


def describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """An op as the log and the refusals name it: ``Conv2d features.0``, ``.view() at view_1``, ``cat() at cat``."""
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} {node.target}"
    if node.op == "call_method":
        return f".{node.target}() at {node.name}"
    return f"{getattr(node.target, '__name__', node.target)}() at {node.name}"


def argument(node: torch.fx.Node, position: int, keyword: str, default: Any) -> Any:
    """An op's argument, given by position or by keyword."""
    if keyword in node.kwargs:
        return node.kwargs[keyword]
    return node.args[position] if len(node.args) > position else default


def reads_shape(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape, size or dimensions, not its values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))
