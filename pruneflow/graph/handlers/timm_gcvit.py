"""GCViT's window attention (timm's ``WindowAttentionGlobal``), kept whole, whose query is the stage's global query
in every other block, and GCViT's ``window_reverse``.

A stage's blocks alternate. The even ones compute q, k and v from their windows (``qkv``, 3 × C rows), as Swin's do;
the odd ones take k and v from their windows (``qkv``, 2 × C rows) and q from the stage's global query: the stream
itself after the stage's ``FeatureBlock`` (MbConv blocks, whose residuals join it, and max poolings, which keep a
zero channel 0), one window's worth of positions, repeated for every window of its image::

    k, v = qkv(x).reshape(B, N, 2, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)   # head_dim: an attribute
    q = q_global.repeat_interleave(B // q_global.shape[0], 0).reshape(B, N, num_heads, head_dim).permute(0, 2, 1, 3)
    x = proj((softmax(q * scale @ kᵀ + rel_pos) @ v).transpose(1, 2).reshape(B, N, C))     # C: its input's width

Both reshape their heads' output by their input's width and their rows by ``head_dim``; both scale by ``scale``,
fixed at construction. The local ones are Swin's: their q/k/v rows a space of heads tied to the stream
(``attention.tied_heads``), the cut sets ``head_dim``. In the global ones, query position j of head h *is* the
stream's channel h · head_dim + j, so key row c meets stream channel c and nothing else: a masked channel's query is
0, and so is its product with any key, so k row c is cut with stream channel c. Value row C + c is cut with it too,
so the heads' output keeps the stream's channels in order and ``proj`` reads them as the stream's (a consumer of
it): ``qkv``'s rows are two channel points of the stream, at 0 and at C. Every head must keep as many query
positions, so the stream is cut at the same positions in each head's block (``ChannelSpace.groups``), and the cut
sets ``head_dim`` to the kept width per head (``held_by``, per head). The relative position bias is per head: the
head count stays. A global query of other channels than the attention's input is refused in one line, with both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers.attention import attention_output, tied_heads
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.timm_attention import unreadable_parts
from pruneflow.graph.handlers.timm_attention_classes import refused
from pruneflow.graph.handlers.timm_windows import channels_last, window_reverse
from pruneflow.graph.nodes import argument
from pruneflow.graph.records import ChannelPoint, PrunableLayer
from pruneflow.graph.registry import register_function_handler, register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def unhandled_variant(module: nn.Module) -> str | None:
    """Why the attention's rows cannot follow its input's channels (None: they can)."""
    if reason := unreadable_parts(module):
        return reason
    width, parts = module.qkv.in_features, 2 if module.use_global else 3
    if module.qkv.out_features != parts * width or module.num_heads * module.head_dim != width:
        return "has heads whose width is not its input's"
    return None


def global_window_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value:
    """``WindowAttentionGlobal``, a leaf: with a global query, ``qkv``'s rows go with the stream (module docstring);
    without one, Swin's tied heads with the head width the cut sets."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    if reason := unhandled_variant(module) or tracer.reused(name):
        return refused(tracer, proj, value, f"global window attention {name} {reason}")
    query = argument(node, 1, "q_global", None)
    if not module.use_global or query is None:  # the query from its own rows: Swin's
        qkv = PrunableLayer(f"{name}.qkv", module.qkv)
        inner, output = tied_heads(tracer, name, qkv, proj, module.num_heads, value)
        tracer.spaces[inner].head_width_of = name
        return output
    query_value = tracer.values.get(query) if isinstance(query, torch.fx.Node) else None
    return global_query_attention(tracer, name, module, value, query_value)


def global_query_attention(
    tracer: Tracer, name: str, module: nn.Module, value: Value | None, query: Value | None
) -> Value:
    """The attention at ``name`` with the global ``query``: ``qkv``'s key and value rows two channel points of the
    stream ``value`` and ``query`` both carry, ``proj`` a reader of it, the stream cut alike in each head's block."""
    proj, width = PrunableLayer(f"{name}.proj", module.proj), module.qkv.in_features
    stream = stream_of(tracer, value, query, width)
    if stream is None:
        reason = f"global window attention {name} reads a global query whose channels are not its input's"
        tracer.refuse(query, reason)
        return refused(tracer, proj, value, reason)
    read(tracer, f"{name}.qkv", module.qkv, value)
    read(tracer, proj.name, module.proj, value)  # the heads' output: the stream's channels, in order
    space = tracer.space(stream)
    for offset in (0, width):  # key rows, then value rows
        space.points.append(ChannelPoint(f"{name}.qkv", module.qkv, offset, (2 * width,)))
    space.groups = tracer.joined_groups(space, module.num_heads, f"global window attention {name}'s heads")
    space.held_by.append((name, "head_dim", module.num_heads))
    return attention_output(tracer, proj, value)


def stream_of(tracer: Tracer, value: Value | None, query: Value | None, width: int) -> int | None:
    """The space both the windows ``value`` and the global ``query`` carry, whole, channels last, ``width`` wide, a
    masked channel still 0 (a key row meets the query's channel of its index); None where they carry anything else."""
    tensors = (value, query)
    usable = [one_whole_space(t) and channels_last(t) and t.width == width and t.revived_by is None for t in tensors]
    if not all(usable):
        return None
    roots = {tracer.union_find.root(t.segments[0][0]) for t in tensors}  # type: ignore[union-attr]
    return roots.pop() if len(roots) == 1 else None


def register() -> None:
    from timm.models import gcvit

    register_module_handler(gcvit.WindowAttentionGlobal, global_window_attention)
    register_function_handler(gcvit.window_reverse, window_reverse)
