"""Channel topology: which convs can be pruned, where each channel's activation can be masked, who reads it.

For every ``nn.Conv2d`` this module finds, by tracing the model with ``torch.fx``:

- the **producer**: the conv whose output channel ``c`` is the kernel ``weight[c]`` (and ``bias[c]``);
- the **norm**: the BatchNorm2d applied directly to the conv's output, if any. Its β matters: an
  all-zero input channel leaves BatchNorm as ``γ·(0 − 0)/√(0 + ε) + β = β``, so a zeroed kernel
  does not make a dead channel;
- the **channel point**: where an activation mask removes the channel for good — the norm's output
  when there is a norm (after β), else the conv's output;
- the **consumers**: the weights that read the channel downstream, through channel-preserving ops
  (activations, pooling, dropout): the next conv's input slice ``weight[:, c]``, or, after a flatten,
  the linear layer's input features ``weight[:, c·k:(c+1)·k]`` (``k`` = spatial positions per channel);
- **coupling**: a channel that reaches a residual addition is shared with the other branch; masking
  it silences only this branch, and cutting it out needs the whole coupled group.
"""

from __future__ import annotations

import fnmatch
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

# Modules that keep channel c in channel c: elementwise ones (also safe after a flatten) and pooling.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
CHANNEL_PRESERVING_MODULES = (
    *ELEMENTWISE_MODULES,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
CHANNEL_PRESERVING_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.silu, torch.nn.functional.gelu,
    torch.nn.functional.leaky_relu, torch.sigmoid, torch.tanh, torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.dropout,
}  # fmt: skip
CHANNEL_PRESERVING_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
RESIDUAL_FUNCTIONS = {operator.add, operator.iadd, torch.add}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass(frozen=True)
class Consumer:
    """A weight that reads a producer's channels: ``kind`` "conv" (input slice) or "linear" (feature block)."""

    name: str
    kind: str
    features_per_channel: int = 1

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along the consumer weight's input dimension (dim 1) that read the given channels."""
        if self.kind == "conv":
            return channels
        k = self.features_per_channel
        return (channels.view(-1, 1) * k + torch.arange(k, device=channels.device)).flatten()


@dataclass
class PrunableLayer:
    """One conv whose output channels can be masked, with its channel point and consumers."""

    name: str
    conv: nn.Conv2d
    norm_name: str | None
    norm: nn.BatchNorm2d | None
    consumers: list[Consumer] = field(default_factory=list)
    coupled: bool = False
    consumers_complete: bool = True

    @property
    def channel_point_name(self) -> str:
        return self.norm_name or self.name

    @property
    def channel_point(self) -> nn.Module:
        """Where the channel is complete: the BatchNorm after the conv, else the conv itself."""
        return self.norm if self.norm is not None else self.conv

    @property
    def num_channels(self) -> int:
        return self.conv.out_channels


def is_flatten(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.Flatten)
    if node.op == "call_function":
        return node.target in FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in FLATTEN_METHODS


def is_channel_preserving(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], CHANNEL_PRESERVING_MODULES)
    if node.op == "call_function":
        return node.target in CHANNEL_PRESERVING_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNEL_PRESERVING_METHODS


def _follow_channel(
    start: torch.fx.Node, modules: dict[str, nn.Module], num_channels: int
) -> tuple[list[Consumer], bool, bool]:
    """Walk forward from a channel point to the weights that read its channels.

    After a flatten, channel ``c`` occupies features ``c·k … (c+1)·k − 1`` and only elementwise ops
    may stand between the flatten and the linear layer that reads them. Returns
    (consumers, coupled, complete): ``complete`` is False when the walk met an op whose effect on
    channels it does not know, so the consumer list may miss someone.
    """
    consumers: list[Consumer] = []
    coupled, complete = False, True
    frontier: list[tuple[torch.fx.Node, bool]] = [(user, False) for user in start.users]
    seen: set[tuple[torch.fx.Node, bool]] = set()
    while frontier:
        node, flattened = frontier.pop()
        if (node, flattened) in seen:
            continue
        seen.add((node, flattened))
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        users = [(user, flattened) for user in node.users]
        if node.op == "output":
            continue
        if flattened:
            if isinstance(module, nn.Linear) and module.in_features % num_channels == 0:
                consumers.append(Consumer(str(node.target), "linear", module.in_features // num_channels))
            elif isinstance(module, ELEMENTWISE_MODULES):
                frontier.extend(users)
            else:
                complete = False
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            consumers.append(Consumer(str(node.target), "conv"))
        elif is_flatten(node, modules):
            frontier.extend((user, True) for user in node.users)
        elif node.op == "call_function" and node.target in RESIDUAL_FUNCTIONS:
            coupled = True
            frontier.extend(users)
        elif is_channel_preserving(node, modules):
            frontier.extend(users)
        else:
            complete = False
    return consumers, coupled, complete


def find_prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every ``Conv2d`` (groups=1) of ``model`` with its norm, channel point, consumers and coupling.

    Falls back to module order (a conv followed by a BatchNorm2d of matching width) with unknown
    consumers when the model cannot be traced symbolically.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # models with data-dependent control flow cannot be traced
        log.warning("could not trace %s with torch.fx (%s); consumers will not be measured", type(model).__name__, exc)
        return _layers_by_module_order(model)
    layers: list[PrunableLayer] = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in graph.nodes:
        conv = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or calls[str(node.target)] != 1:
            continue
        point, norm_name, norm = node, None, None
        if len(node.users) == 1:
            (user,) = node.users
            candidate = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(candidate, nn.BatchNorm2d) and calls[str(user.target)] == 1:
                point, norm_name, norm = user, str(user.target), candidate
        consumers, coupled, complete = _follow_channel(point, modules, conv.out_channels)
        layers.append(PrunableLayer(str(node.target), conv, norm_name, norm, consumers, coupled, complete))
    return layers


def _layers_by_module_order(model: nn.Module) -> list[PrunableLayer]:
    named = list(model.named_modules())
    layers = []
    for index, (name, module) in enumerate(named):
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            following = named[index + 1][1] if index + 1 < len(named) else None
            norm_name = named[index + 1][0] if isinstance(following, nn.BatchNorm2d) else None
            norm = following if norm_name and following.num_features == module.out_channels else None
            layers.append(PrunableLayer(name, module, norm_name if norm else None, norm, [], False, False))
    return layers


def select_layers(layers: Sequence[PrunableLayer], patterns: Iterable[str] | None) -> list[PrunableLayer]:
    """The layers to prune: those matching any glob in ``patterns``; by default every uncoupled conv.

    A glob that matches no prunable conv is an error naming the glob and the convs that exist.
    """
    if patterns is None:
        return [layer for layer in layers if not layer.coupled]
    chosen: dict[str, PrunableLayer] = {}
    for pattern in patterns:
        matches = [layer for layer in layers if fnmatch.fnmatchcase(layer.name, str(pattern))]
        if not matches:
            raise ConfigError(
                f"mask.layers pattern {pattern!r} matches no prunable conv; the model's convs are: "
                f"{', '.join(layer.name for layer in layers)}"
            )
        chosen.update((layer.name, layer) for layer in matches)
    return [layer for layer in layers if layer.name in chosen]
