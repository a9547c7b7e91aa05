"""MViTv2's pooling attention (timm's ``MultiScaleAttention``), kept whole and pruned in whole heads.

Its ``qkv`` writes q, k and v for ``num_heads`` heads (``reshape(B, N, 3, num_heads, -1)``); each of q, k, v is
pooled by a depthwise conv over a head's positions, shared by every head (``pool_q``, ``dim_conv = head_dim``), and
normalised over them (``norm_q``); the logits get a relative position term from q (``rel_pos_h``/``rel_pos_w``, per
head position); with residual pooling the head's output is ``attn @ v + q``; ``proj`` reads every head's output
(``reshape(B, -1, dim_out)``). So a position inside a head is mixed with the head's other positions (the pooling
norms, the relative positions), but a head is computed from its own q, k and v rows alone: whole heads are
independent. A head whose q/k/v rows are 0 is not 0 at the output (the pooling norms' β, then a softmax of them),
so the mask is not at ``qkv``'s rows: the attention is computed again with ``proj``'s columns of the pruned heads
times 0 (``forward_without_heads``, the space's channel point is the attention, ``PrunableLayer.unit``), which is
what the cut network computes once those heads are gone: their rows leave ``qkv``, their columns ``proj``, and the
cut sets ``num_heads`` and ``dim_out`` (``ChannelSpace.head_attributes``); the pooling convs, norms and relative
position tables are per head position and stay whole, the logits' ``scale`` is fixed at construction.

Refused in one line, with their heads: a single head (whole heads are all it could lose), an unshared pooling
(``mode="conv_unshared"``: a depthwise conv and a norm over all heads' positions), projections other than one
``nn.Linear`` ``qkv`` and ``proj``. The stream the attention reads (``qkv``, a consumer) and the one ``proj`` writes
are judged outside it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch.fx
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from pruneflow.graph.handlers.attention import heads_and_output
from pruneflow.graph.handlers.pointwise import is_pointwise
from pruneflow.graph.handlers.producers import add_points, read
from pruneflow.graph.layers import is_layer_norm
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_module_handler
from pruneflow.graph.values import Parts, Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def unhandled_variant(module: nn.Module) -> str | None:
    """Why the attention's heads cannot be cut whole (None: they can)."""
    if module.num_heads < 2:
        return "has one head, and whole heads are all it can lose"
    if module.mode == "conv_unshared":
        return "pools q, k and v over all its heads' positions at once (mode='conv_unshared')"
    if type(module.qkv) is not nn.Linear or type(module.proj) is not nn.Linear:
        return "projects with other layers than one nn.Linear qkv and one proj"
    if module.qkv.out_features != 3 * module.num_heads * module.head_dim or module.dim_out != module.proj.in_features:
        return "has q, k, v rows that are not 3 × heads × head_dim"
    return None


def pooling_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Parts:
    """``MultiScaleAttention``, a leaf returning (output, pooled size): ``pooling_heads``."""
    return Parts((pooling_heads(tracer, str(node.target), module, value), None))


def pooling_heads(tracer: Tracer, name: str, module: nn.Module, value: Value | None) -> Value:
    """Attention ``name``'s ``qkv`` a consumer of ``value`` and the producer of a space of whole heads, masked at
    the attention; its ``proj`` the producer of the output, returned."""
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, unit_name=name, unit=module)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    inner, output = heads_and_output(tracer, qkv, proj, module.num_heads, value)
    heads = tracer.spaces[inner]
    heads.whole_heads, heads.heads_of, heads.head_attributes = True, name, ("num_heads", "dim_out")
    if reason := unhandled_variant(module) or tracer.reused(name):
        heads.refuse(f"pooling attention {name} {reason}")
    if tracer.reused(name):
        tracer.refuse(output, f"pooling attention {name}: {tracer.reused(name)}")
    return output


def forward_without_heads(module: nn.Module, inputs: tuple[Any, ...], keywords: dict[str, Any], keep: Tensor) -> Any:
    """The attention with ``proj``'s columns of the heads ``keep`` prunes (its value rows, per head) times 0: what
    the cut network computes without those heads."""
    columns = keep.to(module.proj.weight.dtype).flatten()[2 * module.dim_out :]
    with _reparametrize_module(module, {"proj.weight": module.proj.weight * columns.view(1, -1)}):
        return module.forward(*inputs, **keywords)  # its own forward, not its call: no hook runs again


def residual(tracer: Tracer, shortcut: Value | None, branch: Value, reason: str) -> Value | None:
    """``shortcut + branch``, each one whole space (the branch a layer's output): one space; a shortcut the graph
    does not follow refuses the branch's."""
    if not one_whole_space(shortcut) or shortcut.width != branch.width:
        tracer.refuse(branch, f"{reason} adds it to a tensor outside the channel graph")
        return None
    root = tracer.union(shortcut.segments[0][0], branch.segments[0][0], reason)
    return Value(((root, 0),), branch.width, ndim=3, channels_last=True)


def normalised(tracer: Tracer, name: str, value: Value | None) -> Value | None:
    """A LayerNorm over the stream's channels, a point of its space (recomputed over the kept channels)."""
    module = tracer.modules[name]
    if value is None or not is_layer_norm(module) or value.width != module.normalized_shape[0]:
        tracer.refuse(value, f"{type(module).__name__} {name} normalises them as the graph does not follow")
        return None
    add_points(tracer, name, module, value, (value.width,))
    return replace(value, revived_by=None)


def linear(tracer: Tracer, name: str, value: Value | None) -> Value:
    """Linear layer ``name`` reading ``value`` (a consumer) and writing a space of its own, channels last."""
    layer = PrunableLayer(name, tracer.modules[name])
    read(tracer, name, layer.producer, value)
    return Value(((tracer.new_space(layer), 0),), layer.producer.out_features, ndim=3, channels_last=True)


def multiscale_block(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Parts:
    """``MultiScaleBlock``, a leaf (its shortcut's pooling reshapes tokens to the grid by a size the attention
    returns, which the walk cannot know): ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, each shortcut through its
    Linear layer where the width changes (``shortcut_proj_attn``/``_mlp``) and max-pooled over the grid per channel
    where the attention pools its queries (a masked channel's zeros stay 0)."""
    name = str(node.target)
    usable = one_whole_space(value) and value.channels_last and value.ndim == 3 and not tracer.reused(name)
    if not usable or value.revived_by is not None:
        tracer.refuse(value, f"multi-scale block {name} {tracer.reused(name) or 'reads them as it cannot follow'}")
        value = None
    normed = normalised(tracer, f"{name}.norm1", value)
    shortcut = value if module.shortcut_proj_attn is None else linear(tracer, f"{name}.shortcut_proj_attn", normed)
    attention = pooling_heads(tracer, f"{name}.attn", module.attn, normed)
    x = residual(tracer, shortcut, attention, f"multi-scale block {name}'s attention residual")
    normed = normalised(tracer, f"{name}.norm2", x)
    shortcut = x if module.shortcut_proj_mlp is None else linear(tracer, f"{name}.shortcut_proj_mlp", normed)
    hidden = linear(tracer, f"{name}.mlp.fc1", normed)
    if not (isinstance(module.mlp.norm, nn.Identity) and is_pointwise(module.mlp.act)):
        tracer.refuse(hidden, f"multi-scale block {name}'s MLP normalises or gates its hidden width")
        hidden = None
    output = residual(tracer, shortcut, linear(tracer, f"{name}.mlp.fc2", hidden), f"multi-scale block {name}'s MLP")
    return Parts((output, None))


def is_plain_block(module: nn.Module) -> bool:
    """A block the handler reads: its attention the pooling attention (not the pool-first variant)."""
    from timm.models.mvitv2 import MultiScaleAttention

    return type(module.attn) is MultiScaleAttention and type(module.mlp).__name__ == "Mlp"


def register() -> None:
    from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock

    register_module_handler(MultiScaleAttention, pooling_attention)
    register_module_handler(MultiScaleBlock, multiscale_block, leaf=is_plain_block)
    ROWS_MASKED_FORWARDS[MultiScaleAttention] = forward_without_heads
