"""The attentions of timm's pyramid ViTs and ConViT that reshape their heads' output by their input's width, kept
whole and pruned with the stream they read: PVT-v2's ``Attention`` and Twins' ``GlobalSubSampleAttn`` (q from one
Linear, k and v from another, ``kv``, after a spatial reduction), ConViT's gated positional ``GPSA`` (q and k from
``qk``, v from ``v``), Twins' ``LocallyGroupedAttn`` (one ``qkv`` inside windows) and ConViT's ``MHSA``; Twins'
position encoding ``PosConv``, a depthwise conv added to the stream, and its tokens reshaped back to the grid of the
patch embedding that wrote them.

Each ends in ``reshape(B, N, C)``, ``C`` its input's width, and reshapes its heads by ``C // num_heads`` (or its
``head_dim``, which the cut sets): its head width is the stream's, so its q/k/v rows are tied to the stream as
BEiT's are (``timm_attention_classes``): as many positions per head as the stream keeps per head, the same
positions from q, k and v. The layers that write them (``PROJECTIONS``) are one space of one channel per head
position (``parts`` 1), a layer writing two of q, k, v its producer through ``RowBlocks`` (channel c is row c of
each of its blocks). The spatial reduction ``sr`` (a strided conv over the stream's map, then a LayerNorm and, in
PVT-v2's linear variant, a pooling before it and a GELU after it) is reshaped by the input's width too
(``sr(x).reshape(B, C, -1)``): its rows are cut with the stream's channels (a producer of the stream's space, masked
at its output and again after its LayerNorm, a point of the space, recomputed over the kept channels), and ``kv``
reads them. ConViT's gating mixes, per head, the softmax of q·k with a positional softmax that reads no channel: a
zero q/k position adds 0 to the logits there too.

Masking: these layers are called inside the attention, ``kv`` on two parts' rows at once, so the attention is their
channel point (``PrunableLayer.unit``), computed again with their pruned rows times 0 (``forward_with_rows``): a
zero q/k position adds 0 to every logit, a zero value position gives a zero output column that ``proj`` no longer
reads. A fused path would scale the logits by the cut head width: the cut turns it off (``unfused_by_cut``), and
the attention's ``scale``, fixed at construction, applies. ``LocallyGroupedAttn`` and ``MHSA`` call their ``qkv``
as a module: masked at its output, as Swin's; the zero padding to whole windows pads positions, not channels.

``PosConv`` (``proj(x) + x`` on the stream's map, stride 1) carries channel c to channel c: a producer of the stream.

VOLO's ``OutlookAttention`` unfolds its values (``v``, one Linear) into each position's k × k neighbourhood per head,
reshaped by ``C // num_heads`` and folded back to ``C`` channels: its value rows are tied to the stream the same way
(one space of head positions, masked at ``v``'s output), its weights (``attn``, a Linear over the pooled map, one
row per head and neighbour pair) read the stream and are no channel's; VOLO's ``Attention`` is ``MHSA``'s.

NesT's ``Attention`` is ``MHSA``'s too, except that it writes its heads' outputs head-minor (position p of head h at
``proj``'s column p · heads + h): kept in order, those columns are the cut attention's only where every head keeps
the same value positions (``ChannelSpace.values_alike``: the criteria select them summed over the heads, the cut
refuses anything else).
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from pruneflow.graph.handlers.attention import attention_output, tie, tied_heads
from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.handlers.timm_windows import windows_view
from pruneflow.graph.layers import RowBlocks, is_depthwise
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_method_handler, register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


# Attentions whose q, k and v rows come from several Linear layers → (layer, how many of q, k, v it writes), in the
# order q, k, v: PVT-v2's and Twins' ``q`` then ``kv``, ConViT's gated ``qk`` then ``v``
PROJECTIONS: dict[type[nn.Module], tuple[tuple[str, int], ...]] = {}


def unhandled_variant(module: nn.Module, value: Value | None) -> str | None:
    """Why a q/kv attention's heads cannot follow the stream it reads (None: they can)."""
    layers = PROJECTIONS[type(module)]
    if not all(type(getattr(module, part)) is nn.Linear for part in (*dict(layers), "proj")):
        return f"projects with other layers than nn.Linear {', '.join(dict(layers))} and proj"
    width = module.proj.in_features
    if any(getattr(module, part).out_features != blocks * width for part, blocks in layers):
        return "has heads whose width is not its input's"
    if not one_whole_space(value) or not value.channels_last or value.ndim != 3 or value.revived_by is not None:
        return "reads a tensor that is not one whole channel space of tokens"
    sr = getattr(module, "sr", None)
    if sr is not None and not (type(sr) is nn.Conv2d and sr.groups == 1 and sr.out_channels == width):
        return "reduces its keys with another layer than a Conv2d as wide as its input"
    if sr is not None and type(module.norm) is not nn.LayerNorm:
        return "normalises its reduced keys with another norm than nn.LayerNorm"
    if type(getattr(module, "act", None)) not in (type(None), nn.GELU):
        return "activates its reduced keys with another function than GELU"
    return None


def reduced_keys(tracer: Tracer, name: str, module: nn.Module, value: Value) -> Value:
    """What ``kv`` reads: the stream itself, or its spatial reduction ``sr`` (a consumer of the stream, reshaped by
    its width: a producer of the stream's space, its LayerNorm the channel point)."""
    sr = getattr(module, "sr", None)
    if sr is None:
        return value
    layer = PrunableLayer(f"{name}.sr", sr)
    read(tracer, layer.name, sr, replace(value, channels_last=False, ndim=4))
    reason = f"attention {name}'s sr, reshaped by its input's width"
    stream = tracer.union(value.segments[0][0], tracer.new_space(layer), reason)
    keys = Value(((stream, 0),), value.width, ndim=3, channels_last=True)
    add_points(tracer, f"{name}.norm", module.norm, keys, (value.width,))
    return keys


def projected_rows(tracer: Tracer, name: str, module: nn.Module, value: Value) -> int:
    """The one space of q/k/v head positions that the attention's ``PROJECTIONS`` write, each a consumer of
    ``value`` (``kv`` of its reduced keys) masked at the attention (``forward_with_rows``); its id."""
    inner = None
    for part, blocks in PROJECTIONS[type(module)]:
        linear = getattr(module, part)
        layer = PrunableLayer(f"{name}.{part}", RowBlocks(linear, blocks) if blocks > 1 else linear, unit_name=name,
                              unit=module)  # fmt: skip
        read(tracer, layer.name, linear, reduced_keys(tracer, name, module, value) if part == "kv" else value)
        space = tracer.new_space(layer)
        inner = space if inner is None else tracer.union(inner, space, f"attention {name}'s q, k and v")
    return inner


def split_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """PVT-v2's ``Attention``, Twins' ``GlobalSubSampleAttn``, ConViT's ``GPSA``, a leaf: its ``PROJECTIONS`` read
    the stream (``kv`` after ``sr``) and write one space of q/k/v head positions tied to it; ``proj`` reads them
    and writes the output."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    if reason := unhandled_variant(module, value) or tracer.reused(name):
        return refused(tracer, proj, value, f"attention {name} {reason}")
    inner = projected_rows(tracer, name, module, value)
    heads = tracer.space(inner)
    heads.heads, heads.parts = module.num_heads, 1
    if hasattr(module, "fused_attn"):
        heads.unfused_by_cut = name
    if hasattr(module, "head_dim"):  # PVT-v2 reshapes k and v by it: the cut sets it
        heads.head_width_of = name
    heads.consumers.append(Consumer(proj.name, "linear"))
    tie(tracer, name, inner, value, module.proj.in_features)
    return attention_output(tracer, proj, value)


def forward_with_rows(module: nn.Module, inputs: tuple[Any, ...], keywords: dict[str, Any], keep: Tensor) -> Tensor:
    """The attention with the q, k and v rows of its ``PROJECTIONS`` (weights and biases) times ``keep``: the
    masked network's attention, its pruned head positions exactly 0."""
    tensors = {}
    for part, blocks in PROJECTIONS[type(module)]:
        linear = getattr(module, part)
        rows = keep.to(linear.weight.dtype).flatten().repeat(blocks)
        tensors[f"{part}.weight"] = linear.weight * rows.view(-1, 1)
        if linear.bias is not None:
            tensors[f"{part}.bias"] = linear.bias * rows
    with _reparametrize_module(module, tensors):  # the module's own forward, not its call: no hook runs again
        return module.forward(*inputs, **keywords)


def tied_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """Twins' ``LocallyGroupedAttn``, ConViT's ``MHSA``, a leaf: its ``qkv`` rows tied to the stream
    (``attention.tied_heads``)."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    linear = type(module.qkv) is nn.Linear and type(module.proj) is nn.Linear
    if not linear or module.qkv.out_features != 3 * module.qkv.in_features:
        return refused(tracer, proj, value, f"attention {name} has q, k, v rows that are not 3 × its input's width")
    inner, output = tied_heads(tracer, name, PrunableLayer(f"{name}.qkv", module.qkv), proj, module.num_heads, value)
    if hasattr(module, "fused_attn"):
        tracer.spaces[inner].unfused_by_cut = name
    return output


def head_minor_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """NesT's ``Attention``, a leaf: its ``qkv`` rows tied to the stream, its heads' outputs laid out head-minor
    (position p of head h at ``proj``'s column p · heads + h): every head keeps the same value positions
    (``ChannelSpace.values_alike``), so the kept columns, in order, are the cut attention's."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    linear = type(module.qkv) is nn.Linear and type(module.proj) is nn.Linear
    if not linear or module.qkv.out_features != 3 * module.qkv.in_features:
        return refused(tracer, proj, value, f"attention {name} has q, k, v rows that are not 3 × its input's width")
    width, heads = module.qkv.in_features, module.num_heads
    qkv = PrunableLayer(f"{name}.qkv", module.qkv)
    read(tracer, qkv.name, module.qkv, value)
    inner = tracer.new_space(qkv)
    space = tracer.space(inner)
    space.heads, space.values_alike, space.unfused_by_cut = heads, True, name
    columns = tuple(p * heads + h for h in range(heads) for p in range(width // heads))
    space.consumers.append(Consumer(proj.name, "linear", at=(-1,) * (2 * width) + columns))
    tie(tracer, name, inner, value, width)
    return attention_output(tracer, proj, value)


def outlook_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """VOLO's ``OutlookAttention``, a leaf: ``v`` reads the map (channels last) and writes its heads' positions
    (``C // num_heads`` each: tied to the stream), unfolded into each position's neighbourhood, weighted and folded
    back per channel, read by ``proj``; ``attn`` reads the pooled map and writes weights per head and neighbour,
    no channel's (its rows stay)."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    linear = all(type(getattr(module, part)) is nn.Linear for part in ("v", "attn", "proj"))
    if not linear or not module.v.in_features == module.v.out_features == module.proj.in_features:
        return refused(tracer, proj, value, f"outlook attention {name} has values that are not as wide as its input")
    values = PrunableLayer(f"{name}.v", module.v)
    read(tracer, values.name, module.v, value)
    read(tracer, f"{name}.attn", module.attn, value)
    inner = tracer.new_space(values)
    heads = tracer.space(inner)
    heads.heads, heads.parts = module.num_heads, 1
    heads.consumers.append(Consumer(proj.name, "linear"))
    tie(tracer, name, inner, value, module.v.in_features)
    return attention_output(tracer, proj, value)


def position_conv(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """Twins' ``PosConv``, a leaf: ``proj(x) + x`` of the stream's map, a depthwise conv at stride 1 carrying
    channel c to channel c: a producer of the stream (masked at its output, before the sum)."""
    name = str(node.target)
    conv = module.proj[0]
    usable = len(module.proj) == 1 and module.stride == 1 and is_depthwise(conv) and one_whole_space(value)
    usable = usable and value.channels_last and value.width == conv.in_channels and value.revived_by is None
    if not usable or tracer.reused(name):
        tracer.refuse(value, f"position conv {name} reads them as it cannot follow (strided, or not one stream)")
        return None
    tracer.space(value.segments[0][0]).producers.append(PrunableLayer(f"{name}.proj.0", conv))
    return value


def patch_grid(tracer: Tracer, value: Value, size: Any, dim: int) -> nn.Conv2d | None:
    """The patch embedding conv whose output grid has ``size`` positions along ``dim`` (2: rows, 3: columns) of
    ``value``'s stream: ``size`` is ``X.shape[dim] // stride``, ``X`` that conv's input, the conv a producer of the
    stream with its kernel its stride and no padding (Twins' ``PatchEmbed``: ``(H // p, W // p)``); None if not."""
    if not (isinstance(size, torch.fx.Node) and size.target is operator.floordiv and len(size.args) == 2):
        return None
    read, stride = size.args
    shape = read.args[0] if isinstance(read, torch.fx.Node) and read.target is operator.getitem else None
    if not (isinstance(shape, torch.fx.Node) and shape.args[1:] == ("shape",) and read.args[1] in (dim, dim - 4)):
        return None
    calls = {node.target: node for node in tracer.graph.nodes if node.op == "call_module"}
    for layer in tracer.space(value.segments[0][0]).producers:
        conv, call = layer.producer, calls.get(layer.name)
        patches = type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding == (0, 0)
        if patches and call is not None and call.args[:1] == (shape.args[0],) and conv.stride[dim - 2] == stride:
            return conv
    return None


def tokens_to_map(tracer: Tracer, node: torch.fx.Node, value: Value | None) -> Any:
    """``x.reshape(B, *size, -1)`` of channels-last tokens, ``size`` the grid of the patch embedding that wrote their
    stream (Twins' stages): (B, H, W, C), the channels last and whole, whatever their width; anything else as
    ``timm_windows.windows_view`` reads it."""
    sizes = node.args[1:]
    usable = one_whole_space(value) and value.channels_last and value.ndim == 3 and value.layout is None
    usable = usable and len(sizes) == 4 and sizes[3] == -1 and value.probe is None and not value.flattened
    if usable and patch_grid(tracer, value, sizes[1], 2) and patch_grid(tracer, value, sizes[2], 3):
        return replace(value, ndim=4)
    return windows_view(tracer, node, value)


def register() -> None:
    from timm.models.convit import GPSA, MHSA
    from timm.models.nest import Attention as NestAttention
    from timm.models.pvt_v2 import Attention as PvtAttention
    from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, PosConv
    from timm.models.volo import Attention as VoloAttention
    from timm.models.volo import OutlookAttention

    PROJECTIONS.update({PvtAttention: (("q", 1), ("kv", 2)), GlobalSubSampleAttn: (("q", 1), ("kv", 2)),
                        GPSA: (("qk", 2), ("v", 1))})  # fmt: skip
    register_module_handler(tuple(PROJECTIONS), split_attention)
    for attention in PROJECTIONS:
        ROWS_MASKED_FORWARDS[attention] = forward_with_rows
    register_module_handler((LocallyGroupedAttn, MHSA, VoloAttention), tied_attention)
    register_module_handler(OutlookAttention, outlook_attention)
    register_module_handler(NestAttention, head_minor_attention)
    register_module_handler(PosConv, position_conv)
    register_method_handler("reshape", tokens_to_map)
