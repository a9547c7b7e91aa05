"""timm's MetaFormer layers (PoolFormerV2, ConvFormer, CAFormer), where timm is installed: its ``Scale`` (a
layer or residual scale, ``x * scale.view(shape)``, one entry per channel), kept whole, its parameter cut with the
channels and the ``shape`` it views it by set to the kept width (``ChannelSpace.held_by``). StarReLU, its
no-bias LayerNorms and ``torch.square`` are taught beside their kin (``timm_layers``, ``pointwise``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.leaves import ChannelwiseLeaf
from pruneflow.graph.registry import register_module_handler
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer


def scale(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """MetaFormer's ``Scale``: a channel-wise leaf (channels at dim 1 for its (C, 1, 1) shape, last for (C,)) whose
    ``scale`` follows the channels; it views it by the ``shape`` it holds, which the cut sets, so it reads one whole
    space (a shape of one width for several spaces' channels would need each one's width)."""
    if value is None:
        return None
    if not one_whole_space(value):
        tracer.refuse(value, f"Scale {node.target} views its scale by a shape it holds for channels of several "
                             "spaces or reordered ones, which the cut does not rebuild")  # fmt: skip
        return None
    output = ChannelwiseLeaf(1 if len(module.shape) > 1 else -1, ("scale",))(tracer, node, module, value)
    if output is not None:
        space = tracer.space(value.segments[0][0])
        holder = (str(node.target), "shape")
        if holder not in space.held_by:
            space.held_by.append(holder)
    return output


def register() -> None:
    from timm.models import metaformer as timm_metaformer

    register_module_handler(timm_metaformer.Scale, scale)
