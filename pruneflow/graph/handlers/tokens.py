"""A transformer's token stream: parameters that are **sources** of the stream's channels, and the selection of
tokens for the head.

A ViT's embedding width is one space from its patch embedding to its head: ``cls_token`` (and ``reg_token``) is
concatenated with the patch tokens along the tokens (dim 1, the channels last), ``pos_embed`` added to them. Each
such parameter writes every channel of the stream, (1, tokens, C): a pruned channel stays 0 only if its entries are
0, so the graph records it as a source (``ChannelSource``): the ``activation`` strategy multiplies it by the keep
mask (a parametrization: 0 in the forward, no gradient), the cut takes its entries out with the channels. A
parameter reaches the op directly (``get_attr``), through ``expand`` over the batch (its shape may be read besides),
``.to(dtype)``, or through timm's ``resample_abs_pos_embed`` and Qwen3-ViT's ``resample_pos_embed_grid`` (per
channel). Added to a conv's map (PiT, Visformer), a (1, C, H, W) parameter is a source along its dim 1: the dim that
meets the channels when broadcast. ``x[:, 0]`` (the class token), ``x[:, k:]``, ``x[:, 0:1, ...]`` and a mean over
the tokens keep the channels where they are, and so does ``x.reshape(B, C, H, W)`` of tokens (B, C, H·W) by a
batch and a width read from shapes (PiT's tokens back to a map). A parameter recorded as a source of two spaces that
stay apart refuses both (``refuse_shared_sources``, after the walk): a cut of one would cut the other.

torchvision's ``VisionTransformer`` turns its patch embedding into tokens with ``x.reshape(n, self.hidden_dim,
n_h * n_w)``: a flatten of the spatial dims, by a width ``torch.fx`` records as a number. It follows a cut only
because the cut sets the attribute that holds it (``ChannelSpace.held_by``, ``WIDTH_HOLDERS``); a reshape by a
number no known attribute holds goes to the probe, as any other.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from pruneflow.graph.handlers import joins, shapes
from pruneflow.graph.nodes import argument, reads_shape
from pruneflow.graph.parameters import attribute
from pruneflow.graph.records import ChannelSource, ChannelSpace
from pruneflow.graph.registry import register_function_handler, register_method_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

# Ops a source parameter may pass through on its way: per channel, its last dim its channels still.
PASSING_METHODS = ("expand", "to")  # ``to``: Qwen3-ViT casts its resampled position embedding to the stream's dtype
# timm's ``resample_abs_pos_embed`` and Qwen3-ViT's ``resample_pos_embed_grid`` (an interpolation of each channel over
# the grid), where timm is installed (``register``)
PASSING_FUNCTIONS: list[Any] = []
# Models that reshape their patch embedding by a width held in an attribute: type → (the producer, the attribute)
WIDTH_HOLDERS: dict[type[nn.Module], tuple[str, str]] = {VisionTransformer: ("conv_proj", "hidden_dim")}


def joins_stream(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an op that records a parameter as a source of the stream it joins, or refuses it."""
    if node.op == "call_method":
        return node.target == "add"
    return node.op == "call_function" and node.target in (operator.add, torch.add, torch.cat)


def source_parameter(tracer: Tracer, node: Any) -> tuple[str, nn.Parameter] | None:
    """(name, parameter) of the parameter ``node`` is, or reaches through ``PASSING_*`` ops; None for anything
    else, and for a parameter read by more than this path (its cut would leave the other reader behind) unless
    every reader joins it to a stream (CaiT's class token, concatenated with the tokens and added to its own
    attention's output): each then records it, and the tracer refuses it where they are different spaces."""
    while isinstance(node, torch.fx.Node) and node.op != "get_attr":
        passing = (node.op == "call_method" and node.target in PASSING_METHODS) or (
            node.op == "call_function" and node.target in PASSING_FUNCTIONS
        )
        users = [user for user in node.users if not reads_shape(user)]  # its shape sizes nothing of its channels
        readers = len(users) == 1 or all(joins_stream(user) for user in users)
        if not passing or not node.args or not readers:
            return None
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or tracer.attribute_reads.get(str(node.target), 0) != 1:
        return None
    parameter = attribute(tracer.model, str(node.target))
    return (str(node.target), parameter) if isinstance(parameter, nn.Parameter) else None


def source_dim(value: Value, parameter: nn.Parameter) -> int | None:
    """The dim of ``parameter`` that meets ``value``'s channels when broadcast against it (aligned from the right:
    the last of channels-last tokens, dim 1 of a (1, C, H, W) position embedding added to a conv's output), if it
    has one entry per channel there; None if not."""
    if value.layout is not None or value.flattened or parameter.ndim < 2 or value.probe is not None:
        return None
    if value.channels_last:
        dim = parameter.ndim - 1
    elif value.ndim is None:
        return None
    else:
        dim = 1 - (value.ndim - parameter.ndim)
    return dim if dim >= 0 and parameter.shape[dim] == value.width else None


def add_source(tracer: Tracer, value: Value, node: Any) -> bool:
    """Record ``node``'s parameter as a source of every space ``value`` carries, if it has one entry per channel on
    the dim that meets ``value``'s channels (``source_dim``); False if not."""
    found = source_parameter(tracer, node)
    dim = None if found is None else source_dim(value, found[1])
    if found is None or dim is None:
        return False
    name = found[0]
    owner, _, attribute_name = name.rpartition(".")
    module = tracer.model.get_submodule(owner) if owner else tracer.model
    for index, offset in value.segments:
        tracer.space(index).sources.append(ChannelSource(name, module, attribute_name, dim, offset))
    return True


def add(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x + pos_embed``: the stream, with the parameter a source of its channels; else an addition (``joins``)."""
    operands = [*node.args, *node.kwargs.values()]
    values = [tracer.values.get(a) if isinstance(a, torch.fx.Node) else None for a in operands]
    stream = [v for v in values if isinstance(v, Value)]
    if len(operands) == 2 and len(stream) == 1:
        other = operands[1] if values[0] is stream[0] else operands[0]
        if add_source(tracer, stream[0], other):
            return stream[0]
    return joins.add(tracer, node, value)


def cat(tracer: Tracer, node: torch.fx.Node, value: Any) -> Any:
    """``torch.cat([cls_token, x], dim=1)`` along the tokens: the stream, each parameter a source of its channels;
    streams concatenated so (CaiT's class tokens and patch tokens) share their channels: one space (``tokens_of``).
    Along the channels, or of anything else, a concatenation (``joins``)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = argument(node, 1, "dim", 0)
    values = [tracer.values.get(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    x = tokens_of(tracer, node, [v for v in values if v is not None], dim)
    if x is None:
        return joins.cat(tracer, node, value)
    others = [part for part, v in zip(parts, values, strict=True) if v is None]
    if all(source_parameter(tracer, part) is not None for part in others) and all(
        add_source(tracer, x, part) for part in others
    ):
        return x
    return joins.cat(tracer, node, value)


def tokens_of(tracer: Tracer, node: torch.fx.Node, stream: list[Any], dim: Any) -> Value | None:
    """The one stream that ``stream`` (values concatenated along ``dim``, their tokens) is: several whole spaces of
    one width, channels last, joined; None where they are not that (``joins`` then concatenates them)."""
    if not stream or not isinstance(dim, int) or not all(isinstance(v, Value) for v in stream):
        return None
    x = stream[0]
    if x.ndim is None or dim % x.ndim == 0 or any(v.channels_at(dim) for v in stream):  # along the batch or channels
        return None
    if len(stream) == 1:
        return x
    usable = all(one_whole_space(v) and v.width == x.width and v.ndim == x.ndim and v.channels_last for v in stream)
    if not usable or any(v.revived_by is not None for v in stream):
        return None
    root = x.segments[0][0]
    for other in stream[1:]:
        root = tracer.union(root, other.segments[0][0], tracer.describe(node))
    return Value(((root, 0),), x.width, ndim=x.ndim, channels_last=True)


def token_item(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x[:, 0]``, ``x[:, k:]``, ``x[:, 0:1, ...]`` of channels-last tokens (N, tokens, C): the channels stay on the
    last dim."""
    index = node.args[1] if len(node.args) > 1 else None
    if isinstance(index, tuple) and index[-1:] == (Ellipsis,):  # ``x[:, 0:1, ...]``: the dims left, whole
        index = index[:-1]
    if value is None or not isinstance(index, tuple) or value.layout is not None or value.flattened:
        return shapes.item(tracer, node, value)
    if not value.channels_last or value.ndim is None or len(index) >= value.ndim or Ellipsis in index:
        return shapes.item(tracer, node, value)
    if index[0] != slice(None) or not all(isinstance(i, (int, slice)) for i in index):
        return shapes.item(tracer, node, value)
    dropped = sum(isinstance(i, int) for i in index)
    return Value(value.segments, value.width, revived_by=value.revived_by, ndim=value.ndim - dropped,
                 channels_last=True)  # fmt: skip


def token_mean(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.mean(1)`` of channels-last tokens: a mean over tokens keeps each channel in place (and a zero at zero);
    anything else as ``shapes`` reduces it."""
    dims = argument(node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else dims
    usable = value is not None and value.channels_last and value.ndim is not None and value.layout is None
    if not usable or not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return shapes.reduced(tracer, node, value)
    reduced = {d % value.ndim for d in dims}
    if 0 in reduced or value.ndim - 1 in reduced:  # over the batch or the channels
        return shapes.reduced(tracer, node, value)
    ndim = value.ndim if argument(node, 2, "keepdim", False) else value.ndim - len(reduced)
    return Value(value.segments, value.width, revived_by=value.revived_by, ndim=ndim, channels_last=True)


def width_holder(tracer: Tracer, node: torch.fx.Node, width: int) -> tuple[str, str] | None:
    """(module, attribute) of a ``WIDTH_HOLDERS`` model holding ``width``, whose producer wrote ``node``'s input."""
    writer = tracer.writer_of.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    for name, module in tracer.modules.items():
        producer, attribute = WIDTH_HOLDERS.get(type(module), (None, None))
        if writer is not None and writer.name == f"{name}{'.' if name else ''}{producer}":
            return (name, attribute) if getattr(module, attribute, None) == width else None
    return None


def patch_tokens(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.reshape(n, hidden_dim, n_h * n_w)`` of a patch embedding (N, C, H, W): its spatial dims flattened, the
    channels at dim 1, the attribute holding ``hidden_dim`` set by the cut; anything else as ``shapes.view``."""
    shape = node.args[1:]
    usable = value is not None and value.ndim == 4 and value.channels_at(1) and one_whole_space(value)
    if usable and not value.flattened and len(shape) == 3 and shape[1] == -1 and token_count(tracer, shape[2]):
        # XCiT's ``pos.reshape(B, -1, x.shape[1])``: -1 is the width exactly where the tokens are H·W, which adding
        # the result to those tokens (B, N, C) needs; the width follows a cut
        return Value(value.segments, value.width, revived_by=value.revived_by, ndim=3)
    if not usable or value.flattened or len(shape) != 3 or shape[1] != value.width:
        return shapes.view(tracer, node, value)
    holder = width_holder(tracer, node, value.width)
    if holder is None:
        return shapes.view(tracer, node, value)
    space = tracer.space(value.segments[0][0])
    if holder not in space.held_by:
        space.held_by.append(holder)
    return Value(value.segments, value.width, revived_by=value.revived_by, ndim=3)


def token_count(tracer: Tracer, entry: Any) -> bool:
    """Whether ``entry`` of a shape is the token count of tokens (B, N, C), read from their shape."""
    read = tracer.shape_reads.get(entry) if isinstance(entry, torch.fx.Node) else None
    return read is not None and read[1] == 1 and read[0].channels_last and read[0].ndim == 3


def spatial_reshape(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.reshape(B, C, H, W)`` of tokens (B, C, H·W), channels at dim 1: only the dims after the channels are
    reshaped (PiT's tokens back to a map), so each channel stays in place, ``B`` read from a tensor's dim 0 and
    ``C`` from a shape of ``x``'s own spaces (a number would not follow a cut); anything else as ``patch_tokens``."""
    shape = node.args[1:]
    usable = value is not None and not value.channels_last and value.ndim is not None and value.ndim >= 3
    if not usable or value.layout is not None or value.flattened or value.probe is not None or len(shape) < 3:
        return patch_tokens(tracer, node, value)
    batch = tracer.shape_reads.get(shape[0]) if isinstance(shape[0], torch.fx.Node) else None
    widths = own_width(tracer, shape[1], value) or residual_width(tracer, shape[1], value)
    if batch is None or batch[1] != 0 or not widths:
        return patch_tokens(tracer, node, value)
    return Value(value.segments, value.width, revived_by=value.revived_by, ndim=len(shape))


def own_width(tracer: Tracer, entry: Any, value: Value) -> bool:
    """Whether ``entry`` of a shape is the width of ``value``'s spaces, all of them, read as it is (it follows a
    cut); arithmetic on it (``c // 2``) is another size, which would mix the channels with the dims after them."""
    from pruneflow.graph.widths import width_of  # ``widths`` imports this package's ``reorderings``

    if not isinstance(entry, torch.fx.Node) or entry in tracer.width_reads:
        return False
    marked = {tracer.union_find.root(i) for i in width_of(tracer, entry)}
    return bool(marked) and marked == {tracer.union_find.root(index) for index, _ in value.segments}


def residual_width(tracer: Tracer, entry: Any, value: Value) -> bool:
    """Whether ``entry`` is the width, read as it is, of another whole space as wide as ``value``'s one whole space
    (NextViT's attention output viewed by its input's ``C`` before the residual adds the two): accepted here, and
    refused after the walk unless the two were joined (``widths.refuse_foreign_widths``)."""
    from pruneflow.graph.widths import width_of

    if not isinstance(entry, torch.fx.Node) or entry in tracer.width_reads or not one_whole_space(value):
        return False
    marked = {tracer.union_find.root(i) for i in width_of(tracer, entry)}
    return len(marked) == 1 and tracer.space(next(iter(marked))).width == value.width


register_method_handler(("view", "reshape"), spatial_reshape)
register_function_handler((operator.add, torch.add), add)
register_method_handler("mean", token_mean)
register_method_handler("add", add)
register_function_handler(torch.cat, cat)
register_function_handler(operator.getitem, token_item)


def register() -> None:
    """timm's pass-through functions for a position embedding (called where timm is installed)."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.qwen3_vit import resample_pos_embed_grid

    PASSING_FUNCTIONS.extend(f for f in (resample_abs_pos_embed, resample_pos_embed_grid) if f not in PASSING_FUNCTIONS)


def refuse_shared_sources(spaces: list[ChannelSpace]) -> None:
    """A parameter recorded as a source of several spaces (a class token joined to two streams that stay apart): a
    cut of one would cut it for the other, so both are refused."""
    holders: dict[str, list[ChannelSpace]] = {}
    for space in spaces:
        for source in space.sources:
            if all(held is not space for held in holders.setdefault(source.name, [])):
                holders[source.name].append(space)
    for name, held in holders.items():
        for space in held if len(held) > 1 else ():
            space.refuse(f"parameter {name} writes the channels of {len(held)} spaces that stay apart")
