"""Compaction's cut: from a masked network, a physically smaller one with the pruned channels taken out.

A channel lives in a **channel space**: the tensors between the convs that write it (its producers) and
the weights that read it (its consumers). In a plain chain one conv writes it; a residual addition sums
the channel points of several convs (stem, ``conv2``/``bn2`` of every block, projection shortcuts) into
one coupled space. Cutting channel ``c`` of a space removes

- row ``c`` of every producer's kernel (and bias) and entry ``c`` of its BatchNorm (γ, β, running
  mean and variance);
- the columns that read ``c`` in every consumer: the next conv's input slice ``weight[:, c]``, or the
  linear layer's features ``c·k … (c+1)·k − 1`` after a flatten.

This is the same function exactly when channel ``c`` is zero everywhere in its space. An ``activation``
mask makes it so: it multiplies the channel by 0 at its channel point (after β), and ReLU, SiLU, GELU,
LeakyReLU, pooling and addition keep a zero channel zero (an activation with f(0) ≠ 0, like Sigmoid,
does not, and verification shows it). In a coupled space that needs every producer to mask ``c``; a
channel masked on one branch only is still carried by the others, so it is refused with an error
naming the layer. The other strategies leave pruned channels alive — ``weight`` and ``none`` through
their kernels, ``gradient``, ``hard`` and ``parametrize`` through β after the activation — so cutting
them changes the function; ``verify`` measures by how much.

(Folding a pruned channel's constant act(β) into its consumer's bias would shrink that gap for a
linear consumer, but not exactly for a padded conv, whose border taps read zeros; it is left out.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pruneflow.errors import ConfigError
from pruneflow.pruning.channels import (
    RESIDUAL_FUNCTIONS,
    Consumer,
    PrunableLayer,
    find_prunable_layers,
    is_channel_preserving,
    is_flatten,
)

log = logging.getLogger(__name__)

MaskLike = Tensor | Sequence[int] | Sequence[bool]

# The per-module hook tables a deep copy inherits; the copy must compute without any of them.
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class CompactionError(ConfigError):
    """A network or mask that cannot be compacted exactly; the message names the layer and why."""


def effective_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` as plain modules: parametrizations baked in, every hook dropped.

    ``parametrize`` masks become plain parameters holding the effective weight (stored ⊙ mask).
    Hooks go because an ``activation`` mask's hook multiplies its channel point by a keep-vector of
    the original width, which fits no compacted tensor and has no place in an exported model. The
    copy is therefore the dense network *without* activation masks: a masked channel's β flows again.
    """
    dense = copy.deepcopy(network)
    for module in list(dense.modules()):
        for table in HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks is not None:
                hooks.clear()
        if parametrize.is_parametrized(module):
            # The deep copy shares the original's injected `Parametrized<Class>`, and removing a
            # parametrization deletes the class's property: the original would lose its `weight`.
            shared = type(module)
            namespace = {key: value for key, value in vars(shared).items() if key not in ("__dict__", "__weakref__")}
            module.__class__ = type(shared.__name__, shared.__bases__, namespace)
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return dense


# -- rebuilding modules at a new width ------------------------------------------------------------
def _conv_args(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
        "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
        "bias": conv.bias is not None, "padding_mode": conv.padding_mode,
    }  # fmt: skip


def _norm_args(norm: nn.BatchNorm2d) -> dict[str, Any]:
    return {
        "num_features": norm.num_features, "eps": norm.eps, "momentum": norm.momentum, "affine": norm.affine,
        "track_running_stats": norm.track_running_stats,
    }  # fmt: skip


def _linear_args(linear: nn.Linear) -> dict[str, Any]:
    return {"in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None}


# type → (constructor arguments of an instance, its (output, input) width arguments). Exact types only:
# a subclass may compute something else from the same tensors.
RESIZABLE: dict[type[nn.Module], tuple[Callable[[Any], dict[str, Any]], tuple[str, str | None]]] = {
    nn.Conv2d: (_conv_args, ("out_channels", "in_channels")),
    nn.BatchNorm2d: (_norm_args, ("num_features", None)),
    nn.Linear: (_linear_args, ("out_features", "in_features")),
}


def _resizable(name: str, module: nn.Module) -> tuple[Callable[[Any], dict[str, Any]], tuple[str, str | None]]:
    entry = RESIZABLE.get(type(module))
    if entry is None:
        raise CompactionError(
            f"{name} is a {type(module).__name__}; compaction rebuilds only "
            f"{', '.join(cls.__name__ for cls in RESIZABLE)} (exact types, not subclasses)"
        )
    return entry


def resized(name: str, module: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A new, uninitialised module like ``module`` with the widths in ``sizes`` (constructor keywords)."""
    arguments, _ = _resizable(name, module)
    tensor = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    placement = {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}
    new = type(module)(**{**arguments(module), **sizes}, **placement)
    new.train(module.training)
    return new


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_sizes(model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Give the named modules of ``model`` new widths in place (uninitialised): the shape of a compacted model."""
    for name, widths in sizes.items():
        replace_module(model, name, resized(name, model.get_submodule(name), widths))
    return model


def cut_module(name: str, module: nn.Module, out_keep: Tensor | None, in_keep: Tensor | None) -> nn.Module:
    """``module`` keeping only output rows ``out_keep`` and input columns ``in_keep`` (None: all).

    Dim 0 of every tensor is the output (kernel rows, bias, BatchNorm's γ, β and running statistics),
    dim 1 of a weight the input; scalar buffers (``num_batches_tracked``) are copied as they are.
    """
    _, (out_arg, in_arg) = _resizable(name, module)
    sizes = {}
    if out_keep is not None:
        sizes[out_arg] = len(out_keep)
    if in_keep is not None and in_arg is not None:
        sizes[in_arg] = len(in_keep)
    state = {}
    for key, tensor in module.state_dict().items():
        if out_keep is not None and tensor.ndim >= 1:
            tensor = tensor.index_select(0, out_keep.to(tensor.device))
        if in_keep is not None and tensor.ndim >= 2:
            tensor = tensor.index_select(1, in_keep.to(tensor.device))
        state[key] = tensor
    new = resized(name, module, sizes)
    new.load_state_dict(state)
    for (_, new_parameter), (_, parameter) in zip(new.named_parameters(), module.named_parameters(), strict=True):
        new_parameter.requires_grad_(parameter.requires_grad)
    return new


# -- channel spaces -------------------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """One channel space: the convs that write it (several when a residual addition sums them) and the
    weights that read it, with the channels cut out of it."""

    producers: list[PrunableLayer]
    consumers: list[Consumer]
    width: int
    removed: Tensor

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.producers]

    @property
    def kept(self) -> Tensor:
        keep = torch.ones(self.width, dtype=torch.bool)
        keep[self.removed] = False
        return keep.nonzero().flatten()


def as_mask(name: str, value: MaskLike, width: int) -> Tensor:
    """A boolean mask (True = pruned) from a bool mask or a list of pruned channel indices."""
    tensor = torch.as_tensor(value).detach().cpu().flatten()
    if tensor.dtype == torch.bool:
        if len(tensor) != width:
            raise CompactionError(f"the mask of {name} has {len(tensor)} entries; {name} has {width} output channels")
        return tensor.clone()
    if len(tensor) and tensor.is_floating_point():
        raise CompactionError(f"the mask of {name} must be booleans or channel indices, got {tensor.dtype} values")
    indices = tensor.long()
    bad = indices[(indices < 0) | (indices >= width)]
    if len(bad):
        raise CompactionError(f"the mask of {name} names channels {bad.tolist()} outside 0..{width - 1}")
    mask = torch.zeros(width, dtype=torch.bool)
    mask[indices] = True
    return mask


def _group_by_channel_space(layers: Sequence[PrunableLayer]) -> list[list[PrunableLayer]]:
    """Layers grouped by the channel space they write: a consumer reads one input tensor, so every
    producer that reaches the same consumer writes the same space (a union over shared consumers)."""
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reader_of: dict[str, int] = {}
    for index, layer in enumerate(layers):
        for consumer in layer.consumers:
            other = reader_of.setdefault(consumer.name, index)
            parent[root(index)] = root(other)
    groups: dict[int, list[PrunableLayer]] = {}
    for index, layer in enumerate(layers):
        groups.setdefault(root(index), []).append(layer)
    return list(groups.values())


def _writers(node: torch.fx.Node, modules: dict[str, nn.Module], norms: set[str]) -> tuple[set[str], list[str]]:
    """Walk back from ``node``: the convs whose channels reach it index for index (through their norms,
    channel-preserving ops, flattens and residual additions), and the names of anything else that does."""
    convs: set[str] = set()
    others: list[str] = []
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        target = str(current.target)
        module = modules.get(target) if current.op == "call_module" else None
        inputs = [arg for arg in current.args if isinstance(arg, torch.fx.Node)]
        if isinstance(module, nn.Conv2d):
            convs.add(target)
        elif current.op == "call_function" and current.target in RESIDUAL_FUNCTIONS:
            stack.extend(inputs)  # a sum of zero channels is zero
        elif inputs and (target in norms or is_channel_preserving(current, modules) or is_flatten(current, modules)):
            stack.append(inputs[0])
        else:
            others.append(current.name)
    return convs, others


def _reaches_output(producer: torch.fx.Node, consumers: set[str]) -> bool:
    """Whether the producer's channels flow into the graph's output without passing through a consumer.

    Only channel-preserving paths are left to check: any other op already made the layer's consumer
    list incomplete, which is refused first.
    """
    stack, seen = [producer], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            return True
        stack.extend(user for user in node.users if not (user.op == "call_module" and str(user.target) in consumers))
    return False


def _check_cuttable(group: ChannelGroup, graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Refuse, naming the layer, any channel space whose readers or writers are not all known."""
    first = group.producers[0].name
    for layer in group.producers:
        if not layer.consumers_complete:
            raise CompactionError(
                f"cannot cut channels of {layer.name}: its output reaches an op whose effect on channels is "
                "unknown (not a conv, BatchNorm, linear after flatten, elementwise op, pooling or addition), "
                "so not every reader of those channels can be sliced"
            )
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    consumer_names = {consumer.name for consumer in group.consumers}
    for layer in group.producers:
        if _reaches_output(calls[layer.name][0], consumer_names):
            raise CompactionError(
                f"cannot cut channels of {layer.name}: they reach the network's output, whose shape would change"
            )
    norms = {layer.norm_name for layer in group.producers if layer.norm_name}
    for consumer in group.consumers:
        nodes = calls.get(consumer.name, [])
        if len(nodes) != 1:
            raise CompactionError(
                f"cannot cut channels of {first}: its consumer {consumer.name} is called {len(nodes)} times, "
                "and slicing it would change its other uses"
            )
        if not nodes[0].args or not isinstance(nodes[0].args[0], torch.fx.Node):
            raise CompactionError(f"cannot cut channels of {first}: cannot find the input of {consumer.name}")
        convs, others = _writers(nodes[0].args[0], modules, norms)
        strangers = sorted(convs - set(group.names)) + others
        if strangers:
            raise CompactionError(
                f"cannot cut channels of {first}: the input of {consumer.name} is also written by "
                f"{', '.join(strangers)}, which are not prunable convs of the same channel space, so a cut "
                "channel would not be zero there"
            )


def plan_cut(network: nn.Module, pruned: Mapping[str, MaskLike]) -> list[ChannelGroup]:
    """The channel spaces of a hook-free ``network`` and the channels to cut from each, checked.

    ``pruned`` maps producer conv names to masks (True = pruned) or pruned channel indices; a
    producer that is absent prunes nothing. A channel is cut when every producer of its space
    prunes it; a channel pruned by some producers of a coupled space but not all is an error.
    """
    layers = find_prunable_layers(network)
    by_name = {layer.name: layer for layer in layers}
    masks: dict[str, Tensor] = {}
    for name, value in pruned.items():
        layer = by_name.get(name)
        if layer is None:
            raise CompactionError(
                f"the masks name {name!r}, which is not a prunable conv of {type(network).__name__}; "
                f"prunable convs: {', '.join(by_name) or 'none'}"
            )
        masks[name] = as_mask(name, value, layer.num_channels)
    groups = []
    for members in _group_by_channel_space(layers):
        width = members[0].num_channels
        member_masks = [masks.get(layer.name, torch.zeros(width, dtype=torch.bool)) for layer in members]
        everywhere = torch.stack(member_masks).all(0)
        for layer, mask in zip(members, member_masks, strict=True):
            partial = mask & ~everywhere
            if partial.any():
                others = [other.name for other in members if other is not layer]
                raise CompactionError(
                    f"cannot cut channels {partial.nonzero().flatten().tolist()} of {layer.name}: they feed a "
                    f"residual addition also written by {', '.join(others)}, where they stay alive; a coupled "
                    "channel can be cut only when every conv of its group prunes it (mask them identically, "
                    "or leave coupled convs out of mask.layers)"
                )
        if everywhere.all():
            raise CompactionError(f"cannot cut all {width} channels of {', '.join(m.name for m in members)}")
        consumers = list({consumer.name: consumer for layer in members for consumer in layer.consumers}.values())
        groups.append(ChannelGroup(members, consumers, width, everywhere.nonzero().flatten()))
    if any(len(group.removed) for group in groups):
        try:
            graph = torch.fx.symbolic_trace(network).graph
        except Exception as exc:  # data-dependent control flow: no graph, so readers cannot be known
            raise CompactionError(
                f"cannot compact {type(network).__name__}: torch.fx cannot trace it ({exc}), so the readers of "
                "its channels are unknown"
            ) from exc
        modules = dict(network.named_modules())
        for group in groups:
            if len(group.removed):
                _check_cuttable(group, graph, modules)
    return groups


# -- the cut --------------------------------------------------------------------------------------
@dataclass
class Compaction:
    """A compacted network with what was cut: ``sizes`` (constructor widths of every rebuilt module) is
    the plain config that, applied to a fresh instance of the original architecture, gives its shape."""

    model: nn.Module
    groups: list[ChannelGroup]
    sizes: dict[str, dict[str, int]]

    @property
    def removed(self) -> dict[str, list[int]]:
        """Channels cut, by producer conv."""
        return {name: group.removed.tolist() for group in self.groups if len(group.removed) for name in group.names}

    @property
    def channels(self) -> tuple[int, int]:
        """(channels before, after), summed over channel spaces."""
        return sum(g.width for g in self.groups), sum(g.width - len(g.removed) for g in self.groups)


def compact(network: nn.Module, pruned: Mapping[str, MaskLike]) -> Compaction:
    """A physically smaller copy of ``network`` with the ``pruned`` channels cut out; ``network`` is untouched.

    Raises ``CompactionError`` naming the layer for anything it cannot cut exactly as a structure:
    an unknown reader, a shared module, a partially pruned coupled channel, an unsupported module type.
    """
    model = effective_copy(network)
    groups = plan_cut(model, pruned)
    out_keep: dict[str, Tensor] = {}
    in_keep: dict[str, Tensor] = {}
    for group in groups:
        if not len(group.removed):
            continue
        kept = group.kept
        for layer in group.producers:
            out_keep[layer.name] = kept
            if layer.norm_name is not None:
                out_keep[layer.norm_name] = kept
        for consumer in group.consumers:
            in_keep[consumer.name] = consumer.columns(kept)
    modules = dict(model.named_modules())
    names = [name for name in modules if name in out_keep or name in in_keep]  # module order: a readable config
    for name in names:  # check every type before changing anything
        _resizable(name, modules[name])
    sizes: dict[str, dict[str, int]] = {}
    for name in names:
        new = cut_module(name, modules[name], out_keep.get(name), in_keep.get(name))
        replace_module(model, name, new)
        _, (out_arg, in_arg) = RESIZABLE[type(new)]
        arguments = RESIZABLE[type(new)][0](new)
        sizes[name] = {arg: int(arguments[arg]) for arg in (out_arg, in_arg) if arg is not None}
    result = Compaction(model, groups, sizes)
    before, after = result.channels
    log.info("compaction: %d of %d channels cut from %d convs", before - after, before, len(result.removed))
    return result
