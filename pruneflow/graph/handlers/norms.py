"""Norms: a BatchNorm, or a LayerNorm over the channels (``LAYER_NORMS``), directly after its producer is that
producer's norm and its channel point (β flows into a zeroed channel: ``γ·(0 − 0)/√(0 + ε) + β = β``, so the
mask goes after it); reading a space among other channels (after a concatenation or an addition) it is a
``ChannelPoint`` of each space it reads. A norm across channels (GroupNorm, a LayerNorm subclass, an InstanceNorm)
mixes them in ways a cut does not reproduce: refused."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import add_points
from pruneflow.graph.layers import LAYER_NORMS, NORM_TYPES, is_layer_norm, norm_width
from pruneflow.graph.nodes import argument
from pruneflow.graph.registry import register_function_handler, register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.records import ChannelSpace
    from pruneflow.graph.tracer import Tracer

NORMS_ACROSS_CHANNELS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
)  # fmt: skip


def norm(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A BatchNorm (over dim 1) or a LayerNorm over the channels: its producer's norm, or a point."""
    name = str(node.target)
    width = norm_width(module)
    dim = LAYER_NORMS.get(type(module), 1)
    source = node.args[0] if node.args else None
    writer = tracer.writer_of.get(source) if isinstance(source, torch.fx.Node) else None
    across = is_layer_norm(module) and len(getattr(module, "normalized_shape", ())) > 1
    if (
        writer is not None
        and writer.norm is None
        and len(source.users) == 1
        and not tracer.reused(name)
        and not across
        and tracer.fits(tracer.width(writer), width)
        and (value is None or value.ndim is None or value.channels_at(dim))
    ):
        writer.norm_name, writer.norm = name, module
        return value
    if value is None:
        return None
    reason = tracer.reused(name) or (
        "it normalises across more than their channels" if across else
        "it reads them flattened" if value.flattened else
        "it normalises another dim than their channels" if not value.channels_at(dim) else
        "their rank is unknown" if value.ndim is None and dim == 1 else
        f"it has {width} channels" if not tracer.fits(value.width, width) else None
    )  # fmt: skip
    if reason:
        tracer.refuse(value, f"{type(module).__name__} {name} reads them among other channels and {reason}, so its "
                             "β would flow into a masked channel")  # fmt: skip
        return None
    # A norm after a concatenation or an addition: each space is masked again at its offset there.
    width = value.width if tracer.widths is not None and value.width is not None else width
    shape = (width,) if dim == -1 else (1, width, *([1] * (value.ndim - 2)))
    add_points(tracer, name, module, value, shape)
    return replace(value, revived_by=None)


def group_norm(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A GroupNorm of G groups normalises each group of C/G consecutive channels over its own channels and positions.
    Reading one whole space, it is that space's norm (or a point of it), and the space is pruned in whole groups
    only (``ChannelSpace.block``): a kept group's statistics are then its own, as in the cut norm of fewer groups,
    and a pruned group is masked at its output. Reading anything else, its groups would straddle the cut: refused."""
    if value is None:
        return None
    whole = one_whole_space(value) and tracer.fits(value.width, module.num_channels) and value.channels_at(1)
    if not whole or value.flattened:
        return across_channels(tracer, node, module, value)
    space = tracer.space(value.segments[0][0])
    space.block = math.lcm(space.block, module.num_channels // module.num_groups)
    return norm(tracer, node, module, value)


def refuse_mixed_blocks(spaces: list[ChannelSpace]) -> None:
    """A space cut in whole GroupNorm groups cannot also be cut at the same positions in each group of a grouped
    conv, in head multiples, or placed by route: refused, naming both."""
    for space in spaces:
        heads = space.heads > 1 or space.multiple > 1 or space.tied
        reordered = space.reordered or space.splits
        other = "a grouped conv's groups" if space.groups > 1 else "attention heads" if heads else \
            "a reordering" if reordered else None  # fmt: skip
        if space.block > 1 and other:
            space.refuse(f"it is normalised in groups of {space.block} channels and also cut by {other}")


def across_channels(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> None:
    groups = getattr(module, "num_groups", None)
    detail = f", {groups} group(s) of {module.num_channels} channels" if isinstance(groups, int) else ""
    tracer.refuse(value, f"{type(module).__name__} {node.target} normalises across channels{detail} (not supported)")


def group_norm_function(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> None:
    """``F.group_norm`` (a GroupNorm subclass traced into): its statistics mix the channels of a group."""
    groups = argument(node, 1, "num_groups", None)
    tracer.refuse(value, f"{tracer.describe(node)} normalises across channels in {groups} group(s) (not supported)")


def layer_norm(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A LayerNorm over the channels (exact types) is a norm; a subclass may compute something else: refused."""
    if is_layer_norm(module):
        return norm(tracer, node, module, value)
    return across_channels(tracer, node, module, value)


register_module_handler(NORM_TYPES, norm, leaf=False)
register_module_handler(NORMS_ACROSS_CHANNELS, across_channels, leaf=False)
register_module_handler(nn.GroupNorm, group_norm, leaf=False)
register_module_handler(tuple(LAYER_NORMS), layer_norm)
register_function_handler(torch.nn.functional.group_norm, group_norm_function)
