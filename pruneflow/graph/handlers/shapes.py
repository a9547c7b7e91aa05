"""Shape ops: flattens, poolings, spatial reductions and permutes, which keep each channel whole but may move it
(channel-major after a flatten, to the last dim after a permute) or refuse it (a pooling across channels); and
the shapes themselves (``x.size()``, ``x.shape``, ``C // groups``), recorded as a reshape probe sees them."""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from pruneflow.graph import calls
from pruneflow.graph.handlers import slices
from pruneflow.graph.nodes import argument
from pruneflow.graph.registry import (
    module_rule,
    register_function_handler,
    register_method_handler,
    register_module_handler,
)
from pruneflow.graph.values import UNKNOWN, Parts, Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

F = torch.nn.functional

POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
POOLING_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool2d)  # fmt: skip
# Resampling keeps each channel apart and a zero channel at zero (nearest, bilinear: sums of zeros)
RESAMPLING_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
PADDING_MODULES: tuple[type[nn.Module], ...] = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                                                nn.ReplicationPad2d)  # fmt: skip
ADAPTIVE_POOLING_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
# Integer arithmetic on shapes, evaluated where its inputs are known (a shuffle's ``C // groups``).
SHAPE_ARITHMETIC = {operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.neg}
# The sizes a probe gives the dims other than the channels: distinct primes, so a reshape that mixed a spatial or
# the batch dim into the channels could not come back to the probe's shape by chance.
PROBE_SIZES = (2, 3, 5, 7, 11)


def flattened(tracer: Tracer, node: torch.fx.Node, value: Value | None, start: Any, end: Any) -> Value | None:
    """A flatten of the spatial dims only keeps every channel; one of the channels with every dim after
    them is channel-major (channel c's features are a block); anything else — a flatten that keeps a
    spatial dim after the channels, of a tensor of unknown rank — is refused."""
    if value is None:
        return None
    if isinstance(start, int) and start >= 2 and isinstance(end, int) and not value.flattened:
        # spatial dims only (``x.flatten(2)``): every channel keeps its index
        if end == -1 or value.ndim is None:
            return replace(value, ndim=start + 1 if end == -1 else None)
        return replace(value, ndim=value.ndim - (end % value.ndim - start))
    whole = start == 1 and (end == -1 or (value.ndim is not None and end == value.ndim - 1))
    if whole and value.spatial_one and not value.flattened and value.channels_at(1):
        return replace(value, ndim=2, spatial_one=False)  # (N, C): a linear layer or a LayerNorm reads dim 1
    if not whole or value.flattened or not value.channels_at(1) or value.layout is not None:
        tracer.refuse_unknown(node, [value])
        return None
    return replace(value, flattened=True, ndim=2)


def flatten(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    """``torch.flatten(x, start, end)``, ``x.flatten(start, end)``."""
    start, end = argument(node, 1, "start_dim", 0), argument(node, 2, "end_dim", -1)
    return flattened(tracer, node, value, start, end)


def flatten_module(tracer: Tracer, node: torch.fx.Node, module: nn.Flatten, value: Value | None) -> Value | None:
    return flattened(tracer, node, value, module.start_dim, module.end_dim)


def view(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.view(x.size(0), -1)`` is a flatten; any other view or reshape goes to the probe (``UNKNOWN``)."""
    if len(node.args) == 3 and node.args[2] == -1:
        return flattened(tracer, node, value, 1, -1)
    return UNKNOWN


def pooled(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    if value is not None and (value.flattened or value.channels_last):  # it would pool across channels
        tracer.refuse_unknown(node, [value])
        return None
    if value is not None and pools_to_one(tracer, node):
        return replace(value, spatial_one=True)
    return value


def pools_to_one(tracer: Tracer, node: torch.fx.Node) -> bool:
    """An adaptive pooling to 1 × 1: what a flatten then gives is (N, C), the channels at dim 1 and last."""
    if node.op == "call_module":
        module = tracer.modules[str(node.target)]
        size = getattr(module, "output_size", None) if "Adaptive" in type(module).__name__ else None
    else:
        adaptive = node.target in ADAPTIVE_POOLING_FUNCTIONS
        size = argument(node, 1, "output_size", None) if adaptive else None
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def spatial_reduction(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> bool:
    """Whether the reduction takes every spatial dim (all after the channels, or between the batch and the channels
    where they are last: MambaOut's ``x.mean((1, 2))``), leaving (N, C)."""
    dims = argument(node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else dims
    if value is None or value.ndim is None or value.flattened or not isinstance(dims, (list, tuple)):
        return False
    spatial = range(1, value.ndim - 1) if value.channels_last else range(2, value.ndim)
    return value.ndim > 2 and sorted(d % value.ndim for d in dims if isinstance(d, int)) == list(spatial)


def reduced(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.mean((2, 3))``/``x.amax(...)`` over every spatial dim: (N, C), the channels at dim 1 and last (a linear
    layer or a BatchNorm1d reads them, RepViT's head), or (N, C, 1, 1) with ``keepdim``."""
    if not spatial_reduction(tracer, node, value):
        return UNKNOWN
    if argument(node, 2, "keepdim", False):
        return value
    return replace(value, ndim=2, spatial_one=False, channels_last=False)  # (N, C): dim 1 is the last


def padded(tracer: Tracer, node: torch.fx.Node, value: Value | None, pad: Any, fill: Any) -> Any:
    """Padding of the spatial dims keeps every channel (timm's ``pad_same``, TResNet's; Swin's windows, channels
    last, pad (0, 0) on them: ``(0, 0, 0, pad_w, 0, pad_h)``); a constant other than 0 makes a masked channel
    non-zero at the border. Padding that reaches the channels or the batch: unknown."""
    if value is None:
        return None
    spatial = 2 * (value.ndim - 2) if value.ndim is not None and not value.flattened else 0
    if value.channels_last:  # pad's first pair is the last dim's, the channels': it must add none
        spatial = spatial + 2 if isinstance(pad, (list, tuple)) and tuple(pad[:2]) == (0, 0) else 0
    if not isinstance(pad, (list, tuple)) or not 0 < len(pad) <= spatial or value.flattened:
        return UNKNOWN
    return value if fill in (None, 0) else replace(value, revived_by=tracer.describe(node))


def pad_function(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``F.pad(x, pad, mode, value)``: reflecting or replicating zeros gives zeros, only a constant ≠ 0 revives."""
    constant = argument(node, 2, "mode", "constant") == "constant"
    return padded(tracer, node, value, argument(node, 1, "pad", None), argument(node, 3, "value", 0) if constant else 0)


def pad_module(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    return padded(tracer, node, value, module.padding, getattr(module, "value", 0))


def rolled(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``torch.roll(x, shifts, dims)`` along dims other than the channels' (Swin's shifted windows) moves positions,
    not channels; along the channels, or flattened (no ``dims``): unknown."""
    dims = argument(node, 2, "dims", None)
    dims = (dims,) if isinstance(dims, int) else dims
    if value is None or not isinstance(dims, (list, tuple)) or not dims or value.flattened or value.ndim is None:
        return UNKNOWN if value is not None else None
    if any(not isinstance(d, int) or value.channels_at(d) for d in dims) or value.layout is not None:
        return UNKNOWN
    return value


def permuted(tracer: Tracer, node: torch.fx.Node, value: Value | None, dims: Any) -> Value | None:
    """A permute moves the channels: to dim 1 or to the last dim they stay readable (a conv reads dim 1, a
    linear layer the last); anywhere else, or of a flattened tensor or one of another rank, it is refused."""
    if value is None:
        return None
    ndim = len(dims) if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims) else 0
    order = [d % ndim for d in dims] if ndim else []
    where = ndim - 1 if value.channels_last else 1
    if ndim < 2 or value.flattened or value.ndim not in (None, ndim) or where not in order:
        tracer.refuse_unknown(node, [value])
        return None
    moved_to = order.index(where)
    if moved_to not in (1, ndim - 1):
        tracer.refuse(value, f"{tracer.describe(node)} moves them to dim {moved_to}: no reader there")
        return None
    return replace(value, ndim=ndim, channels_last=moved_to == ndim - 1 and ndim > 2)


def permute_function(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    return permuted(tracer, node, value, argument(node, 1, "dims", None))


def permute_method(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Value | None:
    dims = node.args[1] if len(node.args) == 2 else node.args[1:] or node.kwargs.get("dims")
    return permuted(tracer, node, value, dims)


# shapes, as a reshape probe has them
def probe_shape(value: Value) -> tuple[int, ...] | None:
    """The shape a probe of ``value`` has: its channels at their dim, ``PROBE_SIZES`` elsewhere."""
    if value.ndim is None or value.width is None or value.flattened or value.ndim > len(PROBE_SIZES) + 1:
        return None
    where = value.ndim - 1 if value.channels_last else 1
    others = iter(PROBE_SIZES)
    return tuple(value.width if d == where else next(others) for d in range(value.ndim))


def record_shape(tracer: Tracer, node: torch.fx.Node, value: Value | Parts | None, dim: Any) -> None:
    """``x.size()``/``x.shape`` of a channel value as its probe has it: what a reshape's arguments come from."""
    if value is None or isinstance(value, Parts):
        return
    tracer.shape_reads[node] = (value, dim if isinstance(dim, int) else None)  # a width, if at the channels
    shape = tuple(value.probe.shape) if value.probe is not None else probe_shape(value)
    if shape is not None:
        tracer.concrete[node] = shape if dim is None else shape[dim] if isinstance(dim, int) else None


def size(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> None:
    """A shape carries no channel; what is built from it is judged where it is used."""
    record_shape(tracer, node, value, argument(node, 1, "dim", None))


def metadata(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.shape``, ``x.ndim``, ``x.dtype``, ``x.device``: a tensor's metadata carries no channel."""
    if node.args[1:2] not in (("shape",), ("ndim",), ("dtype",), ("device",)):
        return UNKNOWN
    if node.args[1] == "shape":
        record_shape(tracer, node, value, None)
    return None


def rank(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> None:
    """``x.dim()``: a number, no channel (torchvision's ViT asserts its tokens' rank with it)."""
    return None


def item(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x[i]`` of something that carries no channel (a shape, a tuple of outputs) carries none either; a slice of
    every channel (GhostNet's ``out[:, :C]`` of C channels) is the tensor itself, cropped or not in space."""
    if value is None:
        return None
    index = node.args[1] if len(node.args) > 1 else None
    at = value.ndim - 1 if value.channels_last and value.ndim is not None else 1
    whole = isinstance(index, tuple) and all(isinstance(entry, slice) for entry in index) and not value.flattened
    if not whole or (value.channels_last and value.ndim is None) or len(index) > (value.ndim or 0):
        return UNKNOWN
    channels = index[at] if len(index) > at else slice(None)
    reaches_the_end = channels.stop is None or (value.width is not None and channels.stop >= value.width)
    every = channels.start in (None, 0) and channels.step in (None, 1) and reaches_the_end
    return value if every else slices.sliced(tracer, node, value, channels)


def stacked(tracer: Tracer, node: torch.fx.Node, value: Any) -> Any:
    """``torch.stack(tensors, dim)`` of channels-last tensors that all carry the same spaces at the same channels,
    along a new dim before the channels (CoaT's class tokens of its scales, ``stack([x[:, 0] ...], dim=1)``): each
    slice keeps channel c at c, so the channels stay last."""
    tensors, dim = node.args[0], argument(node, 1, "dim", 0)
    values = [tracer.values.get(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
    first = values[0] if values else None
    named = calls.signature(tracer, values)  # each space by its union's root: residuals joined them since
    alike = isinstance(first, Value) and all(v == named[0] for v in named) and first.channels_last
    alike = alike and first.ndim is not None
    if not alike or first.layout is not None or first.flattened or not isinstance(dim, int):
        return UNKNOWN
    if not -first.ndim - 1 < dim < first.ndim and dim != -1:  # the new dim before the channels
        return UNKNOWN
    return replace(first, ndim=first.ndim + 1)


def squeezed(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.squeeze(d)`` of channels-last ``x`` at a dim before the channels: they stay last. Its rank is known where
    that dim has size 1, which a kernel-1 conv of one output channel writes (CoaT's ``aggregate``); else unknown."""
    dim = argument(node, 1, "dim", None)
    if value is None or not value.channels_last or value.ndim is None or value.layout is not None:
        return UNKNOWN
    if not isinstance(dim, int) or dim % value.ndim == value.ndim - 1 or value.flattened:
        return UNKNOWN
    writer = node.args[0]
    module = tracer.modules.get(str(writer.target)) if writer.op == "call_module" else None
    one = isinstance(module, nn.Conv1d) and module.out_channels == 1 and dim % value.ndim == 1
    return replace(value, ndim=value.ndim - 1 if one else None)


def shape_arithmetic(tracer: Tracer, node: torch.fx.Node) -> bool:
    """Evaluate integer arithmetic on recorded shapes (``C // groups``); True if ``node`` was such a step."""
    if node.op != "call_function" or node.target not in SHAPE_ARITHMETIC:
        return False
    args, known = resolved(tracer, node.args)
    first = node.args[0] if node.args else None
    if not known or not isinstance(first, torch.fx.Node) or first not in tracer.concrete:
        return False
    try:
        tracer.concrete[node] = node.target(*args)
    except (TypeError, IndexError, ZeroDivisionError):
        return False
    return True


def resolved(tracer: Tracer, arguments: Any) -> tuple[Any, bool]:
    """``arguments`` with each node replaced by its recorded shape or shape arithmetic; False if one is not."""
    missing: list[torch.fx.Node] = []

    def resolve(node: torch.fx.Node) -> Any:
        if node not in tracer.concrete:
            missing.append(node)
        return tracer.concrete.get(node)

    return torch.fx.map_arg(arguments, resolve), not missing


register_module_handler((*POOLING_MODULES, *RESAMPLING_MODULES), module_rule(pooled), leaf=False)
register_function_handler((*POOLING_FUNCTIONS, F.interpolate, F.upsample), pooled)
register_module_handler(PADDING_MODULES, pad_module, leaf=False)
register_function_handler(F.pad, pad_function)
register_module_handler(nn.Flatten, flatten_module, leaf=False)
register_function_handler(torch.flatten, flatten)
register_method_handler("flatten", flatten)
register_method_handler(("view", "reshape"), view)
register_method_handler(("mean", "amax"), reduced)
register_function_handler(torch.permute, permute_function)
register_function_handler(torch.roll, rolled)
register_method_handler("roll", rolled)
register_method_handler("permute", permute_method)
register_method_handler("size", size)
register_function_handler(torch.stack, stacked)
register_method_handler("squeeze", squeezed)
register_method_handler(("dim", "ndimension"), rank)
register_function_handler(getattr, metadata)
register_function_handler(operator.getitem, item)
