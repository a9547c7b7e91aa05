"""timm's split attentions, kept whole: SKNet's ``SelectiveKernel`` and ResNeSt's ``SplitAttn``, whose paths are
weighted by a softmax over the paths, not over the channels.

``SelectiveKernel`` (SKNet): ``num_paths`` ConvNormAct paths (each reading its own equal part of the input where
``split_input``), stacked on a new dim, summed over it and pooled; ``attn.fc_reduce`` (then its BatchNorm) reads that
sum, ``attn.fc_select`` writes ``num_paths × C`` logits viewed (B, paths, C, 1, 1), a softmax over the paths weighs
each path, and the weighted paths are summed. ``SplitAttn`` (ResNeSt): one grouped conv writes ``radix × C`` rows
(radix-major, then its BatchNorm), viewed (B, radix, C, H, W) and summed over the radix for ``fc1`` (then ``bn1``),
``fc2`` writes ``radix × C`` logits, ``RadixSoftmax`` takes the softmax over the radix, and the weighted radix parts
are summed.

A softmax over the paths keeps channels independent: channel c of the output is ``Σ_p x_p[c] · softmax_p(l[p, c])``,
so channel c of every path and logit row (p, c) follow channel c. Under ``activation`` masks a pruned channel is 0 in
every path (each path's norm masks it), so the pooled sum the attention reads is 0 there (its reader's column cut),
its logits are masked at the logit layer's output (a point of the space, entry p·C + c) and its weighted sum is 0:
the cut computes the masked network. SKNet's paths are one coupled space and ``fc_select``'s rows points of it, one
per path; ResNeSt's conv is the space's producer, cut at the same position in each of its ``radix`` groups (its rows
(p, c) and (q, c) together: ``ChannelSpace.groups``), ``fc2``'s rows points of it, and the output carries the first
radix part's channels (the others are cut with them). The attention's hidden width (``fc_reduce``/``fc1`` rows) is a
space of its own. A SelectiveKernel that splits its input reads it in ``num_paths`` equal parts by the width it holds
(``in_channels``, set by the cut as a split's sizes): its input space is cut at the same positions in each part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.pointwise import is_pointwise, keeps_zero
from pruneflow.graph.handlers.producers import read, read_grouped
from pruneflow.graph.handlers.reorderings import EqualParts
from pruneflow.graph.handlers.slices import record
from pruneflow.graph.records import ChannelPoint, Consumer, PrunableLayer
from pruneflow.graph.registry import register_module_handler, register_split_sizes
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def selective_kernel(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``SelectiveKernel``, a leaf: its paths read the input and write one space, read by ``attn.fc_reduce``;
    ``attn.fc_select``'s rows (p, c) are points of it; the output carries it."""
    name = str(node.target)
    reason = tracer.reused(name) or selective_kernel_variant(module)
    if reason is None and value is not None:
        read_paths(tracer, name, module, value)
    elif value is not None:
        tracer.refuse(value, f"SelectiveKernel {name} {reason}")
    index = None
    for p, path in enumerate(module.paths):
        layer = PrunableLayer(f"{name}.paths.{p}.conv", path.conv, f"{name}.paths.{p}.bn", path.bn)
        own = tracer.new_space(layer)
        index = own if index is None else tracer.union(index, own, f"SelectiveKernel {name}'s sum of its paths")
    attention_space(tracer, f"{name}.attn", module.attn, ("fc_reduce", "bn", "fc_select"), index)
    if reason is not None:
        tracer.space(index).refuse(f"SelectiveKernel {name} {reason}")
    return Value(((index, 0),), tracer.space(index).width, ndim=4)


def read_paths(tracer: Tracer, name: str, module: nn.Module, value: Value) -> None:
    """Each path's conv reads the input whole, or (``split_input``) its own part of it: then the input is cut at the
    same positions in every part (blocks of one group's columns of the paths' convs), and the cut sets the width the
    forward splits it by (``in_channels``: a split by sizes, ``EqualParts``)."""
    if not module.split_input:
        for p, path in enumerate(module.paths):
            conv = path.conv
            (read_grouped if conv.groups > 1 else read)(tracer, f"{name}.paths.{p}.conv", conv, value)
        return
    if not one_whole_space(value) or value.flattened or not value.channels_at(1) or value.revived_by is not None:
        tracer.refuse(value, f"SelectiveKernel {name} splits them into its paths with other channels")
        return
    space = tracer.space(value.segments[0][0])
    block = module.paths[0].conv.in_channels // module.paths[0].conv.groups
    space.groups = tracer.joined_groups(space, space.width // block, f"SelectiveKernel {name}'s split")
    for p in range(len(module.paths)):
        space.consumers.append(Consumer(f"{name}.paths.{p}.conv", "grouped", block=block))
    record(tracer, value.segments[0][0], name, (space.width // len(module.paths),) * len(module.paths))


def attention_space(tracer: Tracer, name: str, attn: nn.Module, layers: tuple[str, str, str], index: int,
                    parts: int = 1) -> None:
    """The attention over the paths, ``layers`` (reduce, its norm, select): ``reduce`` reads the pooled sum of space
    ``index`` over its ``parts`` (ResNeSt's radix parts, one column per channel of a part) and writes a space of its
    own, read by ``select``, whose logit rows are points of space ``index``: row p·C + c follows channel c (SKNet's
    ``num_paths`` logits per channel) or row p·C + c channel p·C + c (ResNeSt's, whose space holds the radix parts)."""
    reduce, norm, select = layers
    space = tracer.space(index)
    reader = Consumer(f"{name}.{reduce}", "grouped", block=space.width // parts) if parts > 1 else None
    space.consumers.append(reader or Consumer(f"{name}.{reduce}", "conv"))
    norm_module = getattr(attn, norm)
    hidden = PrunableLayer(f"{name}.{reduce}", getattr(attn, reduce), *(
        (f"{name}.{norm}", norm_module) if not isinstance(norm_module, nn.Identity) else ()))
    tracer.space(tracer.new_space(hidden)).consumers.append(Consumer(f"{name}.{select}", "conv"))
    logits = getattr(attn, select)
    shape = (1, logits.out_channels, 1, 1)
    for p in range(logits.out_channels // space.width):
        space.points.append(ChannelPoint(f"{name}.{select}", logits, p * space.width, shape))


def selective_kernel_variant(module: nn.Module) -> str | None:
    """Why its paths cannot be cut as one space (None: they can)."""
    for path in module.paths:
        if type(path.conv) is not nn.Conv2d or not isinstance(path.bn, nn.BatchNorm2d):
            return "has a path other than a Conv2d and its BatchNorm"
        after = (getattr(path, "aa", None), getattr(path.bn, "drop", None), getattr(path.bn, "act", None))
        if not all(is_pointwise(part) for part in after if part is not None):
            return "has a path with a layer after its norm that is not channel-wise"
    attn = module.attn
    if type(attn.fc_reduce) is not nn.Conv2d or type(attn.fc_select) is not nn.Conv2d or attn.fc_reduce.groups > 1:
        return "has an attention of other layers than plain 1 × 1 convs"
    return None


def split_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``SplitAttn``, a leaf: its grouped ``conv`` reads the input and writes the radix parts, one space cut at the
    same positions in each part; ``fc1`` reads their sum, ``fc2``'s rows are points of it; the output carries the
    first part's channels."""
    name = str(node.target)
    reason = tracer.reused(name) or split_attention_variant(module)
    if reason is None and value is not None:
        (read_grouped if module.conv.groups > 1 else read)(tracer, f"{name}.conv", module.conv, value)
    elif value is not None:
        tracer.refuse(value, f"SplitAttn {name} {reason}")
    norm = () if isinstance(module.bn0, nn.Identity) else (f"{name}.bn0", module.bn0)
    index = tracer.new_space(PrunableLayer(f"{name}.conv", module.conv, *norm))
    space = tracer.space(index)
    space.groups = tracer.joined_groups(space, module.conv.groups, f"SplitAttn {name}'s grouped conv")
    attention_space(tracer, name, module, ("fc1", "bn1", "fc2"), index, parts=module.radix)
    if reason is not None:
        space.refuse(f"SplitAttn {name} {reason}")
    width = space.width // module.radix
    output = Value(((index, 0),), space.width, ndim=4)
    return tracer.with_layout(output, tuple((index, c) for c in range(width)), by_position=False)


def split_attention_variant(module: nn.Module) -> str | None:
    """Why its radix parts cannot be cut as one space (None: they can)."""
    if not all(type(getattr(module, part)) is nn.Conv2d for part in ("conv", "fc1", "fc2")):
        return "projects with other layers than plain convs"
    if module.rsoftmax.cardinality > 1 or module.fc1.groups > 1:
        return f"takes its softmax in {module.rsoftmax.cardinality} cardinal groups, whose rows are interleaved"
    if not all(keeps_zero(part) for part in (module.drop, module.act0, module.act1)):
        return "applies a layer that is not channel-wise or turns a 0 into f(0) ≠ 0 after its norms"
    return None


def register() -> None:
    from timm.layers.selective_kernel import SelectiveKernel
    from timm.layers.split_attn import SplitAttn
    from timm.models.edgenext import SplitTransposeBlock
    from timm.models.res2net import Bottle2neck

    register_module_handler(SelectiveKernel, selective_kernel)
    register_module_handler(SplitAttn, split_attention)
    register_split_sizes(Bottle2neck, EqualParts("width"))
    register_split_sizes(SelectiveKernel, EqualParts("in_channels", whole=True))
    # EdgeNeXt's SDTA block chunks its stream into scales, one scale's conv added to the next: Res2Net's hierarchy
    register_split_sizes(SplitTransposeBlock, EqualParts("width"))
