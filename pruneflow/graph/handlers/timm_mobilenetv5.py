"""MobileNetV5's (and MobileNetV4's hybrids') blocks that the walk cannot read by tracing into them, read whole: the
multi-query attention on maps (``MultiQueryAttention2d``) and the multi-scale fusion adapter
(``MobileNetV5MultiScaleFusionAdapter``, kept whole by timm).

``MultiQueryAttention2d``: ``query.proj`` writes ``num_heads`` × ``key_dim`` q rows (head-major: row h · key_dim + d),
``key.proj`` one head of ``key_dim`` k rows and ``value.proj`` one head of ``value_dim`` v rows, shared by every q
head. Head h's logits are Σ_d q[h, d] · k[d] · scale: a key dim d adds nothing where k[d] is 0, so it is cut from k
and from q in every head at once, and the other dims' sums are untouched. So k's rows are the space, q's rows its
points once per head (``slices``' embedding: q's own space leaves the graph), and the cut sets ``key_dim``, by which
the attention reshapes q. The fused path scales the logits by 1/√(the cut key_dim): the cut turns it off
(``ChannelSpace.unfused_by_cut``), so ``scale``, fixed at construction at the full width, applies as in the masked
network. Head h's output (h · value_dim + e, in ``output.proj``'s columns) is its softmax times v[e]: v's rows are
another space, read by ``output.proj`` once per head; the cut sets ``value_dim``. Keys and values downsampled
(``kv_stride``) by a depthwise conv and its norm carry the input's channels: producers of the input's space, as
EfficientFormerV2's strided convs are (``timm_mobile_attention.carry``); a q pooled (``query_strides``) by an average
pool is normalised over the input's channels (``query.norm``, a point of its spaces), its output upsampled channel by
channel before ``output.proj``.

``MobileNetV5MultiScaleFusionAdapter``: each input (the last stages' outputs) resized channel by channel to the first
one's size, concatenated along the channels, read by its FFN (a universal inverted residual without skip: ``pw_exp``
then ``pw_proj``, each conv-norm-act, their widths spaces of their own), pooled or resized channel by channel and
normalised over ``pw_proj``'s channels (``norm``, a point of that space). An FFN with other layers (a depthwise conv,
an SE gate, a layer scale, a skip) is refused in one line naming it, with its inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.handlers.timm_mobile_attention import carry, conv_layer
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def space_of(tracer: Tracer, layer: PrunableLayer) -> tuple[int, Value]:
    """A new space written by ``layer`` and a map (B, C, H, W) carrying it."""
    index = tracer.new_space(layer)
    return index, Value(((index, 0),), tracer.width(layer), ndim=4)


def read_downsampled(tracer: Tracer, name: str, path: str, module: nn.Module, value: Value | None) -> None:
    """``key`` or ``value`` at ``path``: a depthwise ``down_conv`` and its ``norm`` (where keys and values are
    downsampled) carrying ``value``'s space, then ``proj`` reading it."""
    branch = getattr(module, path)
    if hasattr(branch, "down_conv"):
        down = PrunableLayer(f"{name}.{path}.down_conv", branch.down_conv, f"{name}.{path}.norm", branch.norm)
        carry(tracer, down, value, f"attention {name} (MultiQueryAttention2d)")
    read(tracer, f"{name}.{path}.proj", branch.proj, value)


def multi_query_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """timm's ``MultiQueryAttention2d``, a leaf: k's rows a space, q's rows its points once per head (a key dim
    cut from k and every head's q), v's rows a space read by ``output.proj`` once per head, ``output.proj`` writing
    its output."""
    name, heads, key_dim, value_dim = str(node.target), module.num_heads, module.key_dim, module.value_dim
    if hasattr(module.query, "norm") and value is not None and value.width is not None:
        add_points(tracer, f"{name}.query.norm", module.query.norm, value, (1, value.width, 1, 1))
    query = PrunableLayer(f"{name}.query.proj", module.query.proj)
    read(tracer, query.name, query.producer, value)
    for path in ("key", "value"):
        read_downsampled(tracer, name, path, module, value)
    queries = tracer.new_space(query)
    keys = tracer.space(key_index := tracer.new_space(PrunableLayer(f"{name}.key.proj", module.key.proj)))
    # q's rows h · key_dim + d go with k's row d: q's space embedded in k's once per head
    tracer.embedded += [(queries, key_index, 0, tuple(range(h * key_dim, (h + 1) * key_dim))) for h in range(heads)]
    keys.held_by.append((name, "key_dim"))
    keys.unfused_by_cut = name
    values = tracer.space(values_index := tracer.new_space(PrunableLayer(f"{name}.value.proj", module.value.proj)))
    values.held_by.append((name, "value_dim"))
    values.consumers += [Consumer(f"{name}.output.proj", "conv", at=tuple(range(h * value_dim, (h + 1) * value_dim)))
                         for h in range(heads)]  # fmt: skip
    _, output = space_of(tracer, PrunableLayer(f"{name}.output.proj", module.output.proj))
    reason = tracer.reused(name)
    if module.query.proj.out_channels != heads * key_dim:
        reason = f"writes {module.query.proj.out_channels} q rows, not num_heads × key_dim"
    if reason:
        inner = Value(((key_index, 0), (queries, 0), (values_index, 0)), None)
        tracer.refuse_all((value, output, inner), f"attention {name} (MultiQueryAttention2d) {reason}")
    return output


def unread_ffn_part(ffn: nn.Module) -> str | None:
    """The first part of the fusion adapter's FFN that it is not read through: a universal inverted residual of two
    pointwise conv-norm-acts and nothing else (None: that is all it has)."""
    for part in ("dw_start", "dw_mid", "se", "dw_end", "layer_scale"):
        if not isinstance(getattr(ffn, part, nn.Identity()), nn.Identity):
            return part
    return "its skip" if getattr(ffn, "has_skip", False) else None


def fusion_adapter(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """MobileNetV5's ``MobileNetV5MultiScaleFusionAdapter``, a leaf: its inputs side by side (each resized channel by
    channel), read by its FFN's ``pw_exp``, ``pw_proj`` writing its output, ``norm`` a point of it."""
    name = str(node.target)
    inputs = tracer.input_values(node)
    known = all(v is not None and v.width is not None and v.layout is None and not v.flattened and v.channels_at(1)
                for v in inputs)  # fmt: skip
    part = unread_ffn_part(module.ffn)
    reason = tracer.reused(name) or (f"has a {part} in its FFN, which is not read" if part else None)
    if reason or not known or not inputs:
        tracer.refuse_all(inputs, f"fusion adapter {name} {reason or 'concatenates tensors of unknown channels'}")
        return None
    segments, offset = [], 0
    for tensor in inputs:
        segments += [(index, offset + inner) for index, inner in tensor.segments]
        offset += tensor.width
    revived = next((tensor.revived_by for tensor in inputs if tensor.revived_by), None)
    value = Value(tuple(segments), offset, revived_by=revived, ndim=4)
    for layer in ("pw_exp", "pw_proj"):
        producer = conv_layer(f"{name}.ffn.{layer}", getattr(module.ffn, layer))
        read(tracer, producer.name, producer.producer, value)
        _, value = space_of(tracer, producer)
    add_points(tracer, f"{name}.norm", module.norm, value, (1, value.width, 1, 1))
    return value


def register() -> None:
    from timm.layers.attention2d import MultiQueryAttention2d
    from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter

    register_module_handler(MultiQueryAttention2d, multi_query_attention)
    register_module_handler(MobileNetV5MultiScaleFusionAdapter, fusion_adapter)
