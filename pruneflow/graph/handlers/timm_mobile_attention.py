"""timm's mobile hybrid attentions on maps (B, C, H, W), kept whole: the stream they read and the space they write
stay prunable where a cut of them is exact, their inner rows cut where one is, else refused in one line naming why.

EfficientViT-MIT's ``LiteMLA`` (a ReLU linear attention: ``qkv`` 1 × 1, multi-scale aggregation by a depthwise and a
grouped conv per scale, heads of ``dim`` channels, v padded with ones for the denominator) and EfficientFormerV2's
``Attention2d`` and ``Attention2dDownsample`` (talking heads: 1 × 1 convs across the heads before and after the
softmax, a learned bias per head) read their input only through convs (consumers: a masked input channel is 0 in
every column they read, so cutting those columns changes nothing) and write their output with one conv and its
BatchNorm (``proj``: a producer, its channel point the norm). A depthwise conv that reads the input itself
(``Attention2d``'s ``stride_conv``, ``Attention2dDownsample``'s local query) carries channel c to its own channel c
and may add a bias: it joins the input's space as a producer, cut and masked with it (as the walk reads a depthwise
conv on one whole space).

LowFormer's and CPUBone's ``ConvAttention`` read their input the same way, through a strided depthwise ``conv_proj``
(a carrier) and ``pwise``; their output is written by a 1 × 1 conv (``o_proj``, or the first layer of the
``upsampling`` it is fused into) and carried channel by channel by a depthwise transposed conv or a nearest resize,
each masked after its bias, then cropped. LowFormer's ``fuse_out_proj`` writes it with a dense transposed conv, whose
output channels lie along its weight's dim 1: a producer of the stream all the same (``TransposedRows``: its weight
seen transposed; the cut takes dim 1), masked at its output. Their q/k/v rows
(``pwise``'s, reshaped by ``num_heads`` and ``head_dim``, each head's q, k and v side by side) are kept whole.

Their inner rows, where cut exactly:

- ``LiteMLA``: heads of ``dim`` q, k and v rows side by side (``reshape(B, -1, 3 * dim, H * W)``), aggregated per scale
  by a depthwise conv and a conv grouped by ``dim`` (which mixes a head's q positions among themselves, so no position
  inside a head can go), read by ``proj`` as the values of every scale's heads. A whole head can: with its rows 0 (no
  bias anywhere before the attention), ReLU(q) = ReLU(k) = 0, kᵀ[v, 1] = 0, and its output 0 / (0 + eps) = 0 in
  every scale. So the rows are one space pruned in whole heads (``ChannelSpace.block``, 3 × dim), the aggregation's
  convs its producers (the grouped one loses whole groups: ``compaction.cut.takes_whole_groups``), ``proj`` reading
  each scale's values; the head count follows from the width, so the cut sets nothing.
- ``Attention2d``: its talking heads mix every head's logits (a pruned head's logits are its bias, not 0), so the
  heads stay; inside a head, q and k positions go together (a zero position adds 0 to every logit, the scale is fixed
  at construction) and value positions on their own (each a column of the head's output, carried by ``v_local``), as
  many in every head (reshaped by ``num_heads``); the cut sets ``dh``, by which it reshapes its output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn

from pruneflow.graph.handlers.producers import read
from pruneflow.graph.layers import LAYER_NORMS, TransposedRows, is_depthwise
from pruneflow.graph.records import Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def conv_layer(name: str, module: nn.Module) -> PrunableLayer:
    """A conv, or a module holding a conv and its norm (timm's ``ConvNorm``, ``ConvNormAct``, ``Conv2dNorm``), as a
    producer whose channel point is the norm."""
    if isinstance(module, nn.Conv2d):
        return PrunableLayer(name, module)
    children = dict(module.named_children())
    if isinstance(children.get("conv"), nn.Sequential):  # CPUBone's: a padding, then its conv
        children |= {f"conv.{index}": child for index, child in enumerate(children["conv"])}
    conv_name = next(child for child in ("conv", "c", "conv.1") if isinstance(children.get(child), nn.Conv2d))
    norm_name = next((child for child in ("bn", "norm") if is_channel_norm(children.get(child))), None)
    norm = (f"{name}.{norm_name}", children[norm_name]) if norm_name else (None, None)
    return PrunableLayer(f"{name}.{conv_name}", children[conv_name], *norm)


def is_channel_norm(module: nn.Module | None) -> bool:
    """A BatchNorm, or a norm over a map's channels (``LAYER_NORMS``: MobileNetV5's RMS norms): a conv's norm."""
    return isinstance(module, nn.BatchNorm2d) or (module is not None and LAYER_NORMS.get(type(module)) == 1)


def carry(tracer: Tracer, layer: PrunableLayer, value: Value | None, why: str) -> None:
    """A depthwise ``layer`` reading ``value``: a producer of its one whole space; else the space is refused."""
    whole = one_whole_space(value) and value.channels_at(1) and not value.flattened and value.revived_by is None
    if not (is_depthwise(layer.producer) and whole and tracer.fits(value.width, layer.producer.in_channels)):
        tracer.refuse(value, f"{why}: its depthwise conv {layer.name} reads a tensor that is not one whole space")
        return
    tracer.space(value.segments[0][0]).producers.append(layer)


def submodule_or_none(module: nn.Module, path: str) -> nn.Module | None:
    """``module``'s submodule at ``path``, None where an attribute on the way is None (an optional layer)."""
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
    return module


def output_writers(name: str, module: nn.Module) -> list[PrunableLayer] | str:
    """What writes a ``ConvAttention``'s output: its 1 × 1 ``o_proj`` (or the one first in its ``upsampling``), then
    a depthwise transposed conv or a nearest upsampling (channel by channel), or a dense transposed conv alone; why
    not, where anything else does."""
    upsampling = module.upsampling
    steps = list(upsampling) if isinstance(upsampling, nn.Sequential) else [upsampling]
    names = [f"{name}.upsampling.{i}" for i in range(len(steps))] if isinstance(upsampling, nn.Sequential) else [
        f"{name}.upsampling"]  # fmt: skip
    if type(module.o_proj) is nn.Conv2d:
        steps, names = [module.o_proj, *steps], [f"{name}.o_proj", *names]
    writers = [PrunableLayer(n, step) for n, step in zip(names, steps, strict=True) if type(step) is not nn.Upsample
               and not isinstance(step, nn.Identity)]  # fmt: skip
    nearest = all(step.mode == "nearest" for step in steps if type(step) is nn.Upsample)
    first_is_conv = bool(writers) and type(writers[0].producer) is nn.Conv2d and not is_depthwise(writers[0].producer)
    if isinstance(upsampling, nn.ConvTranspose2d) and not is_depthwise(upsampling):  # fuse_out_proj=True
        if upsampling.groups > 1 or not isinstance(module.o_proj, nn.Identity):
            return (f"writes its output with a transposed conv of groups={upsampling.groups} after its o_proj (read "
                    "only with groups=1 and no o_proj)")  # fmt: skip
        # the one writer, read as a conv's rows; masked at its own output
        return [PrunableLayer(names[0], TransposedRows(upsampling), unit_name=names[0], unit=upsampling)]
    if not (nearest and first_is_conv and all(is_depthwise(layer.producer) for layer in writers[1:])):
        return "upsamples its output by another layer than a depthwise transposed conv or a nearest resize"
    return writers


def heads_layout(module: nn.Module) -> str | None:
    """Why ``LiteMLA``'s heads cannot be cut whole (None: they can): the parts a pruned head's zeros would not
    cross as zeros, or a layout other than its qkv's 1 × 1 conv, one depthwise and one grouped conv per scale."""
    qkv = module.qkv
    if not (isinstance(qkv.norm, nn.Identity) and isinstance(qkv.act, nn.Identity) and qkv.conv.bias is None):
        return "normalises, activates or biases its q/k/v rows before aggregating them"
    if type(module.kernel_func) is not nn.ReLU or module.eps <= 0:
        return "maps q and k by another kernel than a ReLU"
    for scale in module.aggreg:
        if len(scale) != 2 or not is_depthwise(scale[0]) or scale[1].groups * module.dim != scale[1].in_channels:
            return "aggregates its q/k/v rows with other layers than a depthwise conv and a conv grouped by dim"
        if scale[0].bias is not None or scale[1].bias is not None:
            return "adds a bias when aggregating its q/k/v rows"
    return None


def linear_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """EfficientViT-MIT's ``LiteMLA``, a leaf: ``qkv`` reads its input and writes heads of ``dim`` q, k and v rows
    side by side, pruned in whole heads only (``ChannelSpace.block`` 3 × dim): a pruned head's q, k, v are 0 in
    every scale (no bias), its ReLU-linear attention gives 0 / (0 + eps) = 0. Each scale's depthwise and grouped conv
    carry the rows (a producer of them, the grouped conv losing whole groups); ``proj`` reads every scale's values
    (heads of the first scale first) and writes the output."""
    name, dim = str(node.target), module.dim
    qkv, proj = conv_layer(f"{name}.qkv", module.qkv), conv_layer(f"{name}.proj", module.proj)
    read(tracer, qkv.name, qkv.producer, value)
    heads = tracer.space(tracer.new_space(qkv))
    width, scales = heads.width, len(module.aggreg) + 1
    for index, scale in enumerate(module.aggreg):
        heads.producers += [PrunableLayer(f"{name}.aggreg.{index}.{i}", scale[i]) for i in range(2)]
    for index in range(scales):  # row c of head c // 3dim: a value row is read by proj at that head of this scale
        at = [-1 if c % (3 * dim) < 2 * dim else (index * width // 3 + c // (3 * dim) * dim + c % dim)
              for c in range(width)]  # fmt: skip
        heads.consumers.append(Consumer(proj.name, "conv", at=tuple(at)))
    heads.block = 3 * dim
    if reason := tracer.reused(name) or heads_layout(module):
        heads.refuse(f"attention {name} (LiteMLA) {reason}")
    if tracer.reused(name):
        tracer.refuse(value, f"attention {name} (LiteMLA) {reason}")
    return Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=4)


def upsampled_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """LowFormer's and CPUBone's ``ConvAttention``, a leaf: its input carried by its strided depthwise ``conv_proj``
    and read by ``pwise`` (its q/k/v rows refused), its output written by a 1 × 1 conv and carried by a depthwise
    transposed conv (each masked after its bias) or a nearest upsampling, then cropped."""
    name = str(node.target)
    why = f"attention {name} (ConvAttention)"
    writers = output_writers(name, module)
    reason = tracer.reused(name) or (writers if isinstance(writers, str) else None)
    if reason is None:
        carry(tracer, conv_layer(f"{name}.conv_proj", module.conv_proj), value, why)
    pwise = PrunableLayer(f"{name}.pwise", module.pwise)
    read(tracer, pwise.name, pwise.producer, value)
    tracer.space(tracer.new_space(pwise)).refuse(
        f"{why} lays each head's q, k and v rows side by side (it reshapes by num_heads and head_dim): its rows are "
        "kept whole")  # fmt: skip
    if reason is not None:  # its output, as wide as its input, is read as its input: refused with it, in one line
        tracer.refuse(value, f"{why} {reason}")
        return value
    output = tracer.new_space(writers[0])
    tracer.space(output).producers.extend(writers[1:])
    return Value(((output, 0),), tracer.width(writers[0]), ndim=4)


def talking_heads(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """EfficientFormerV2's ``Attention2d`` and ``Attention2dDownsample``, a leaf: its input carried by its depthwise
    ``stride_conv`` or local query and read by ``q``, ``k`` and ``v``; its q and k rows one space of ``num_heads``
    heads (a position cut from both: ``ChannelSpace.parts`` 1), its v rows another, carried by ``v_local`` and read
    by ``proj``, which writes its output; the cut keeps as many positions in every head and sets ``dh``."""
    name = str(node.target)
    why = f"attention {name} ({type(module).__name__})"
    for path in ("stride_conv", "q.local"):  # the depthwise conv reading its input, where it has one
        if (carrier := submodule_or_none(module, path)) is not None:
            carry(tracer, conv_layer(f"{name}.{path}", carrier), value, why)
    q_name = "q.proj" if hasattr(module.q, "proj") else "q"  # the downsampling one's local-global query
    q, k, v = (conv_layer(f"{name}.{part}", module.get_submodule(part)) for part in (q_name, "k", "v"))
    for layer in (q, k, v):
        read(tracer, layer.name, layer.producer, value)
    query_key = tracer.union(tracer.new_space(q), tracer.new_space(k), f"{why}'s q and k")
    values = tracer.new_space(v)
    proj = conv_layer(f"{name}.proj", module.proj)
    tracer.space(values).producers.append(conv_layer(f"{name}.v_local", module.v_local))
    tracer.space(values).consumers.append(Consumer(proj.name, "conv"))
    tracer.space(values).held_by.append((name, "dh"))
    for index in (query_key, values):
        tracer.space(index).heads, tracer.space(index).parts = module.num_heads, 1
    output = Value(((tracer.new_space(proj), 0),), tracer.width(proj), ndim=4)
    if reason := tracer.reused(name):
        for tensor in (value, output, Value(((query_key, 0), (values, 0)), None)):
            tracer.refuse(tensor, f"{why}: {reason}")
    return output


def register() -> None:
    from timm.models.cpubone import ConvAttention as CPUBoneAttention
    from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample
    from timm.models.efficientvit_mit import LiteMLA
    from timm.models.lowformer import ConvAttention as LowFormerAttention

    register_module_handler(LiteMLA, linear_attention)
    register_module_handler((Attention2d, Attention2dDownsample), talking_heads)
    register_module_handler((LowFormerAttention, CPUBoneAttention), upsampled_attention)
