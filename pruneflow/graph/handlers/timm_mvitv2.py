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
cut sets ``num_heads`` and ``dim_out`` (``ChannelSpace.heads_width``); the pooling convs, norms and relative
position tables are per head position and stay whole, the logits' ``scale`` is fixed at construction.

Refused in one line, with their heads: a single head (whole heads are all it could lose), an unshared pooling
(``mode="conv_unshared"``: a depthwise conv and a norm over all heads' positions), projections other than one
``nn.Linear`` ``qkv`` and ``proj``. The stream the attention reads (``qkv``, a consumer) and the one ``proj`` writes
are judged outside it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from pruneflow.graph.handlers.attention import heads_and_output
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_module_handler
from pruneflow.graph.values import Parts, Value

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
    """``MultiScaleAttention``, a leaf returning (output, pooled size): ``qkv`` a consumer of ``value`` and the
    producer of a space of whole heads, masked at the attention; ``proj`` the producer of the output."""
    name = str(node.target)
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, unit_name=name, unit=module)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    inner, output = heads_and_output(tracer, qkv, proj, module.num_heads, value)
    heads = tracer.spaces[inner]
    heads.whole_heads, heads.heads_of, heads.heads_width = True, name, "dim_out"
    if reason := unhandled_variant(module) or tracer.reused(name):
        heads.refuse(f"pooling attention {name} {reason}")
    if tracer.reused(name):
        tracer.refuse(output, f"pooling attention {name}: {tracer.reused(name)}")
    return Parts((output, None))


def forward_without_heads(module: nn.Module, inputs: tuple[Any, ...], keep: Tensor) -> Any:
    """The attention with ``proj``'s columns of the heads ``keep`` prunes (its value rows, per head) times 0: what
    the cut network computes without those heads."""
    columns = keep.to(module.proj.weight.dtype).flatten()[2 * module.dim_out :]
    with _reparametrize_module(module, {"proj.weight": module.proj.weight * columns.view(1, -1)}):
        return module.forward(*inputs)  # its own forward, not its call: no hook runs again


def register() -> None:
    from timm.models.mvitv2 import MultiScaleAttention

    register_module_handler(MultiScaleAttention, pooling_attention)
    ROWS_MASKED_FORWARDS[MultiScaleAttention] = forward_without_heads
