"""timm's attentions that reshape their heads' output by their input's width: BEiT's ``Attention``, EVA's
``EvaAttention``, CaiT's ``TalkingHeadAttn`` and ``ClassAttn``, ViT-RelPos's ``RelPosAttention``, kept whole and
pruned with the stream they read.

Each ends in ``x.transpose(1, 2).reshape(B, N, C)``, ``C`` its input's width (CaiT's also reshapes q, k, v by
``C // num_heads``): the width of all its heads is the width of the stream. A cut of whole heads (timm's
``Attention``, ``timm_attention``) would leave fewer values than ``C``, a cut of the stream alone more; so these
heads are tied to the stream as Swin's are (``attention.tied_heads``): pruned with it, as many positions per head as
the stream keeps per head, the same query/key positions from q and k (ViT-RelPos reshapes q, k, v by its ``head_dim``:
the cut sets it). Positions inside a head are independent once
the logits' scale is fixed: a zero q/k position adds 0 to every logit, a zero value position gives a zero output
column that ``proj`` no longer reads. The head count stays, so a per-head relative position bias table (BEiT's) and
the talking-heads mixing over the heads (CaiT's ``proj_l``, ``proj_w``: Linear layers over the head dim, which mix a
pruned head's nonzero softmax into the kept ones, so whole heads are not independent there) stay whole and exact.

CaiT's ``ClassAttn`` has three layers ``q`` (of the class token alone), ``k`` and ``v`` (CrossViT's ``CrossAttention``
``wq``, ``wk``, ``wv``, its scale fixed): their rows are one space, coupled (``ChannelSpace.parts`` 1: a position of
a head is cut from all three), tied to the stream the same way.

The scale: the fused path of BEiT's, EVA's and CaiT's class attention (``scaled_dot_product_attention``) divides
the logits by √(head width) read from q's shape, the full width in the masked network and the cut one in the cut
network; their unfused path multiplies by ``scale``, fixed at construction. So the cut turns the fused path off
(``ChannelSpace.unfused_by_cut``) and computes exactly what the masked network did (at the unfused path's speed).
CaiT's talking heads always multiply by their ``scale``.

Where the q/k/v rows are masked: the talking heads call their ``qkv`` (masked at its output). BEiT and EVA with q and
v biases read ``qkv.weight`` through ``F.linear`` with ``cat(q_bias, k_bias, v_bias)``: the attention is the rows'
channel point (``PrunableLayer.unit``), computed again with those rows' weights and biases times the keep mask
(``forward_with_rows``); ``q_bias`` and ``v_bias`` are cut with the rows (``ChannelScale.at``), the zero ``k_bias``
follows them (``compaction.cut``).

EVA's rotary position embedding (``rope``: DINOv3, EVA-02) rotates pairs of positions inside a head, by the same
angles in every head: where its table is read (``timm_rope``), q/k positions are cut by whole frequencies of it, the
same in every head and block, and the cut keeps the fused path, the scale folded into the q rows
(``ChannelSpace.scaled_by_cut``). Where it is not, or a q/k norm normalises over a head's positions, a head's
positions cannot be cut one by one, but whole heads can, as for timm's ``AttentionRope`` (``timm_attention``): a
head whose q, k and v rows are 0 (after the bias) outputs 0 whatever the rope made of its q and k, the other heads
keep their width (so their rope and their logits' scale). Since EVA reshapes its
heads' output by its input's width, its q/k/v space is cut in whole heads **tied** to the stream, which loses one
head's width for each head cut (``attention.whole_heads_tied``; the cut sets ``num_heads``). XCA is cut
the same way (``timm_channel_attention``).

Refused in one line, and the stream with them (the tie): a rope or a q/k norm in BEiT's, CaiT's and ViT-RelPos's
attentions (their per-head tables and talking heads would need cutting with the heads), the parts
``timm_attention.unreadable_parts`` names, and any other tensor the attention is called with (the recomputed forward
would not see it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from pruneflow.graph.handlers.attention import attention_output, tie, tied_heads, whole_heads_tied
from pruneflow.graph.handlers.producers import read
from pruneflow.graph.handlers.timm_attention import unreadable_parts
from pruneflow.graph.handlers.timm_rope import read_rope, rope_frequencies
from pruneflow.graph.nodes import argument
from pruneflow.graph.records import ChannelScale, Consumer, PrunableLayer, RopeFrequencies
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS, register_module_handler
from pruneflow.graph.values import Value

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


# Attentions whose heads are independent of each other (no per-head table, no mixing over the heads): where their
# positions cannot be cut one by one, they are cut in whole heads with their stream (EVA's)
WHOLE_HEADS: set[type[nn.Module]] = set()


def positions_held(node: torch.fx.Node, module: nn.Module, rope: RopeFrequencies | None = None) -> str | None:
    """What holds a head's positions together (None: nothing): a cut of whole heads keeps them. A rope whose table
    is read (``rope``) holds only its frequencies' positions together, which the cut takes whole."""
    if not all(isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm")):
        return "normalises q and k over a head's positions (qk_norm=True)"
    if argument(node, 1, "rope", None) is not None and rope is None:
        return "rotates q and k by a rotary position embedding (rope), pairs of positions a cut would separate"
    return None


def unhandled_variant(node: torch.fx.Node, module: nn.Module) -> str | None:
    """Why the attention's heads cannot follow the stream (None: they can)."""
    rope = argument(node, 1, "rope", None)
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, torch.fx.Node) and a is not rope]
    if others:
        return f"is called with {others[0].name} besides its input, which its masked forward would not see"
    if reason := unreadable_parts(module):
        return reason
    if not module.qkv.in_features == module.proj.in_features == module.qkv.out_features // 3:
        return "has heads whose width is not its input's"
    if type(module) not in WHOLE_HEADS:
        return positions_held(node, module)  # BEiT's, CaiT's, ViT-RelPos': no rope table is read there
    return None


def input_width_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """BEiT's ``Attention``, EVA's ``EvaAttention``, CaiT's ``TalkingHeadAttn``, a leaf: heads tied to the stream,
    per position, or in whole heads where a rope or a q/k norm holds a head's positions together (EVA's)."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    reason = unhandled_variant(node, module)
    if reason:
        return refused(tracer, proj, value, f"attention {name} {reason}")
    biased = getattr(module, "q_bias", None) is not None
    unit = {"unit_name": name, "unit": module} if biased else {}
    qkv = PrunableLayer(f"{name}.qkv", module.qkv, **unit)
    rope = rope_frequencies(tracer, node, module) if type(module) in WHOLE_HEADS else None
    if positions_held(node, module, rope):  # whole heads keep the head width, so the logits' scale, fused or not
        inner, output = whole_heads_tied(tracer, name, qkv, proj, module.num_heads, value)
    else:
        inner, output = tied_heads(tracer, name, qkv, proj, module.num_heads, value)
        if rope is not None:  # its q/k positions by whole frequencies of the table; its fused path kept
            read_rope(tracer, node, inner, rope)
            tracer.spaces[inner].scaled_by_cut = name
        elif hasattr(module, "fused_attn"):
            tracer.spaces[inner].unfused_by_cut = name
        if hasattr(module, "head_dim"):  # ViT-RelPos reshapes q, k, v by it: the cut sets it
            tracer.spaces[inner].head_width_of = name
    if biased:
        tracer.spaces[inner].scales += bias_scales(name, module)
    return output


def bias_scales(name: str, module: nn.Module) -> list[ChannelScale]:
    """An attention's ``q_bias`` and ``v_bias``, one entry per q row and per v row of its q/k/v space."""
    rows = module.q_bias.shape[0]
    q_rows, v_rows = tuple(range(rows)) + (-1,) * (2 * rows), (-1,) * (2 * rows) + tuple(range(rows))
    return [ChannelScale(f"{name}.q_bias", 0, 0, at=q_rows), ChannelScale(f"{name}.v_bias", 0, 0, at=v_rows)]


def forward_with_rows(module: nn.Module, inputs: tuple[Any, ...], keywords: dict[str, Any], keep: Tensor) -> Tensor:
    """BEiT's, EVA's or SwinV2's attention computed with its q/k/v rows (``qkv.weight``'s rows, ``q_bias``,
    ``v_bias``) times ``keep``: the masked network's attention, its pruned rows exactly 0 (``k_bias`` is 0)."""
    rows = keep.to(module.qkv.weight.dtype).flatten()
    width = rows.shape[0] // 3
    tensors = {"qkv.weight": module.qkv.weight * rows.view(-1, 1)}
    if module.q_bias is not None:
        tensors["q_bias"] = module.q_bias * rows[:width]
        tensors["v_bias"] = module.v_bias * rows[2 * width :]
    with _reparametrize_module(module, tensors):  # the module's own forward, not its call: no hook runs again
        return module.forward(*inputs, **keywords)


# Class attentions (the class token's query against every token's key and value) → their q, k and v layers
CLASS_ATTENTION_PARTS: dict[type[nn.Module], tuple[str, str, str]] = {}


def class_attention(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Any:
    """CaiT's ``ClassAttn`` and CrossViT's ``CrossAttention`` (``wq``, ``wk``, ``wv``), a leaf: three layers ``q``
    (of the class token), ``k`` and ``v`` read the stream and
    write the q, k and v rows of every head, one position of a head in all three (coupled, ``parts`` 1), tied to the
    stream; ``proj`` reads them and writes the output."""
    name = str(node.target)
    proj = PrunableLayer(f"{name}.proj", module.proj)
    layers = [PrunableLayer(f"{name}.{part}", getattr(module, part)) for part in CLASS_ATTENTION_PARTS[type(module)]]
    if not all(type(layer.producer) is nn.Linear for layer in (*layers, proj)):
        return refused(tracer, proj, value, f"class attention {name} projects with other layers than nn.Linear")
    for layer in layers:
        read(tracer, layer.name, layer.producer, value)
    inner = tracer.new_space(layers[0])
    for layer in layers[1:]:
        inner = tracer.union(inner, tracer.new_space(layer), f"class attention {name}'s q, k and v")
    heads = tracer.space(inner)
    heads.heads, heads.parts, heads.unfused_by_cut = module.num_heads, 1, name
    heads.consumers.append(Consumer(proj.name, "linear"))
    tie(tracer, name, inner, value, layers[1].producer.in_features)
    return attention_output(tracer, proj, value)


def refused(tracer: Tracer, proj: PrunableLayer, value: Value | None, reason: str) -> Value:
    """An attention whose heads cannot follow the stream: the stream it reads and its output refused."""
    output = attention_output(tracer, proj, value)
    for tensor in (value, output):
        tracer.refuse(tensor, reason)
    return output


def register() -> None:
    from timm.models.beit import Attention as BeitAttention
    from timm.models.cait import ClassAttn, TalkingHeadAttn
    from timm.models.crossvit import CrossAttention
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer_relpos import RelPosAttention

    for attention in (BeitAttention, EvaAttention, TalkingHeadAttn, RelPosAttention):
        register_module_handler(attention, input_width_attention)
    for attention in (BeitAttention, EvaAttention):
        ROWS_MASKED_FORWARDS[attention] = forward_with_rows
    WHOLE_HEADS.add(EvaAttention)
    CLASS_ATTENTION_PARTS.update({ClassAttn: ("q", "k", "v"), CrossAttention: ("wq", "wk", "wv")})
    register_module_handler((ClassAttn, CrossAttention), class_attention)
