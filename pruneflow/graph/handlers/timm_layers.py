"""timm's building blocks, where timm is installed (an optional extra): its norm-and-activation modules
(``BatchNormAct2d``: a BatchNorm whose forward calls ``F.batch_norm``, then its dropout and activation, all
channel-wise), its LayerNorms over the channels, its ``*Same`` convs (a conv after a padding computed from the
input's size), its activations, its layer scales (a per-channel parameter, cut with the channels), and the modules
and functions timm itself declares opaque to ``torch.fx`` (``timm.layers._fx``): kept whole, so a model traces
and only the spaces reaching them are refused, not the whole model."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from pruneflow.graph.handlers import (
    timm_additive_attention,
    timm_attention,
    timm_attention_classes,
    timm_channel_attention,
    timm_coat,
    timm_davit,
    timm_efficientvim,
    timm_focal_modulation,
    timm_gcvit,
    timm_halo,
    timm_hieradet,
    timm_levit,
    timm_metaformer,
    timm_mobile_attention,
    timm_mobile_blocks,
    timm_mobilenetv5,
    timm_mvitv2,
    timm_nextvit,
    timm_partial_attention,
    timm_pyramid_attention,
    timm_rope,
    timm_split_attention,
    timm_tnt,
    timm_vit_likes,
    timm_windows,
    tokens,
)
from pruneflow.graph.handlers.folds import sole_writer
from pruneflow.graph.handlers.norms import group_norm, layer_norm, norm
from pruneflow.graph.handlers.pointwise import ZERO_PRESERVING_MODULES, is_pointwise, passes, register_pointwise
from pruneflow.graph.handlers.producers import producer, read
from pruneflow.graph.handlers.reorderings import first_size_in, halves_of, sizes_held_in, sizes_in
from pruneflow.graph.layers import LAYER_NORMS, RMS_NORMS, SAMPLE_NORMS, is_depthwise, is_layer_norm, output_ndim
from pruneflow.graph.leaves import register_leaf
from pruneflow.graph.records import PrunableLayer
from pruneflow.graph.registry import (
    AUTOWRAP_FUNCTIONS,
    LEAVES,
    module_rule,
    register_module_handler,
    register_split_sizes,
)
from pruneflow.graph.values import Value, one_whole_space

if TYPE_CHECKING:
    from pruneflow.graph.tracer import Tracer

REGISTERED: list[bool] = []  # once: timm's rules go into the tables the first time a trace finds timm imported


def norm_act(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """A BatchNorm (or a LayerNorm over the channels, a GroupNorm) followed by its dropout and activation, all
    channel-wise: a norm, its channel point at its output, after the activation (so a reviving one, sigmoid, is
    masked too)."""
    unknown = [type(part).__name__ for part in (module.drop, module.act) if not is_pointwise(part)]
    if unknown:
        tracer.refuse(value, f"{type(module).__name__} {node.target} applies {unknown[0]}, not known channel-wise")
        return None
    if isinstance(module, nn.GroupNorm) and not is_layer_norm(module):
        return group_norm(tracer, node, module, value)
    return norm(tracer, node, module, value)


def scalar_affine(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """HGNetV2's ``LearnableAffineBlock``, ``scale · x + bias`` with one scale and one bias for every channel: the
    bias makes a masked channel non-zero, so straight after a producer (its norm, its activation) it becomes that
    producer's channel point, where the mask goes; anywhere else it revives the channels it carries."""
    if value is None:
        return None
    layer = sole_writer(tracer, node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    whole = one_whole_space(value) and layer is not None and layer in tracer.space(value.segments[0][0]).producers
    if whole and layer.unit is None and not tracer.reused(str(node.target)):
        layer.unit_name, layer.unit = str(node.target), module
        return replace(value, revived_by=None)
    return replace(value, revived_by=tracer.describe(node))


def standardised_conv(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """timm's weight-standardised convs (``StdConv2d``: BiT's ResNetV2; ``ScaledStdConv2d``: NFNet) standardise
    each kernel row over its own fan-in (its input channels and taps; the scaled ones then multiply it by a per-row
    ``gain`` and ``gamma / √fan-in``). A row's statistics are its own: its rows are a producer's, cut with their
    gain. Cutting an input channel would change every row: no stored kernel of the cut width standardises to the
    kept columns (those have no zero mean), so the spaces it reads are refused — except by a depthwise one, whose
    row reads its own channel only and goes with it."""
    if is_depthwise(module):
        return producer(tracer, node, module, value)
    tracer.refuse(value, f"{type(module).__name__} {node.target} standardises its kernel over its input channels, "
                         "so cutting one would change every row")  # fmt: skip
    return producer(tracer, node, module, None)


def conv_mlp(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """VGG's ``ConvMlp`` head, kept whole (its forward pools a small input up to its kernel size, a branch on a
    shape): ``act2(fc2(drop(act1(fc1(x)))))``, so ``fc1`` reads ``x``'s spaces and writes one that ``fc2`` reads,
    and ``fc2`` writes the output's; the pooling is channel-wise. Their activations must keep a zero a zero (the
    mask is at each conv's output)."""
    name = str(node.target)
    acts = (module.act1, module.act2)
    reviving = [type(act).__name__ for act in acts if not isinstance(act, ZERO_PRESERVING_MODULES)]
    if reviving or tracer.reused(name):
        reason = tracer.reused(name) or f"applies {reviving[0]}, not known to keep a zero a zero"
        tracer.refuse(value, f"ConvMlp {name} {reason}")
        return None
    for conv in ("fc1", "fc2"):
        layer = PrunableLayer(f"{name}.{conv}", getattr(module, conv))
        read(tracer, layer.name, layer.producer, value)
        index = tracer.new_space(layer)
        value = Value(((index, 0),), tracer.width(layer), ndim=output_ndim(layer.producer))
    return value


def blur_pool(tracer: Tracer, node: torch.fx.Node, module: nn.Module, value: Value | None) -> Value | None:
    """timm's ``BlurPool2d`` (anti-aliased downsampling), kept whole (``torch.fx`` cannot expand its filter to a
    traced width): one fixed filter per channel, no bias, so each channel stays apart and a zero stays zero. Built
    for a given number of channels it holds a filter per channel and a group count the cut does not rebuild."""
    if value is None or module.channels is None:
        return value
    tracer.refuse(value, f"BlurPool2d {node.target} holds one filter per channel for {module.channels} channels, "
                         "which the cut does not rebuild")  # fmt: skip
    return None


def register_if_imported() -> None:
    """Register timm's rules once timm is imported (by the model being traced): importing timm here would cost
    every user of the graph its import time."""
    if "timm" in sys.modules and not REGISTERED:
        register()


def register_rms_and_group_norms() -> None:
    import timm.layers as timm_layers
    from timm.models import metaformer

    # RMS norms (MobileNetV5's): γ · x / √(mean of x² over the channels + ε), no mean taken, no β
    rms_norms = {timm_layers.RmsNorm2d: 1, timm_layers.RmsNormAct2d: 1, timm_layers.RmsNorm: -1,
                 timm_layers.RmsNormAct: -1}  # fmt: skip
    LAYER_NORMS.update(rms_norms)
    RMS_NORMS.update(rms_norms)
    register_module_handler((timm_layers.RmsNorm2d, timm_layers.RmsNorm), layer_norm)
    register_module_handler((timm_layers.RmsNormAct2d, timm_layers.RmsNormAct), norm_act)
    # GroupNorms normalise each group of channels: pruned in whole groups (``group_norm``); one group (PoolFormer's
    # GroupNorm1) spans every channel of the sample, which a cut reproduces as a LayerNorm's (``SAMPLE_NORMS``)
    register_module_handler(timm_layers.GroupNorm, group_norm)
    register_module_handler((timm_layers.GroupNormAct, timm_layers.GroupNorm1Act), norm_act)
    for sample_norm in (timm_layers.GroupNorm1, metaformer.GroupNorm1NoBias, timm_layers.GroupNorm1Act):
        LAYER_NORMS[sample_norm] = 1
        SAMPLE_NORMS.add(sample_norm)


def register() -> None:
    import timm.layers as timm_layers
    from timm.layers import _fx as timm_fx
    from timm.layers import activations as timm_activations
    from timm.models import cspnet as timm_cspnet
    from timm.models import dpn as timm_dpn
    from timm.models import fasternet as timm_fasternet
    from timm.models import inception_next as timm_inception_next
    from timm.models import mambaout as timm_mambaout
    from timm.models import metaformer
    from timm.models import rexnet as timm_rexnet
    from timm.models import vgg as timm_vgg
    from timm.models.hgnet import LearnableAffineBlock

    REGISTERED.append(True)
    for family in (timm_attention, timm_attention_classes, timm_channel_attention, timm_levit, timm_additive_attention,
                   timm_mvitv2, timm_mobile_attention, timm_mobile_blocks, timm_split_attention, timm_focal_modulation,
                   timm_nextvit, timm_metaformer, timm_vit_likes, timm_windows, timm_pyramid_attention, timm_hieradet,
                   timm_coat, timm_halo, timm_partial_attention, timm_gcvit, timm_rope, timm_mobilenetv5,
                   timm_efficientvim, tokens, timm_tnt, timm_davit):  # fmt: skip
        family.register()
    zero_preserving = ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish", "Tanh")
    register_pointwise(tuple(getattr(timm_activations, name) for name in zero_preserving))
    register_pointwise((timm_activations.Sigmoid, timm_activations.HardSigmoid), preserves_zero=False)
    # stochastic depth: each sample times 0 or 1/keep, all channels alike; kept whole (traced, its noise refuses)
    register_module_handler(timm_layers.DropPath, module_rule(passes))
    register_module_handler(timm_layers.BatchNormAct2d, norm_act)
    register_module_handler((timm_layers.Conv2dSame, timm_layers.Linear), producer)
    # MetaFormer's StarReLU, ``s · relu(x)² + b``, one s and one b for all channels: a scalar affine after a square
    register_module_handler((LearnableAffineBlock, metaformer.StarReLU), scalar_affine)
    standardised = (timm_layers.StdConv2d, timm_layers.StdConv2dSame, timm_layers.ScaledStdConv2d,
                    timm_layers.ScaledStdConv2dSame)  # fmt: skip
    register_module_handler(standardised, standardised_conv)
    register_module_handler(timm_layers.BlurPool2d, blur_pool)
    register_module_handler(timm_vgg.ConvMlp, conv_mlp)
    LAYER_NORMS[timm_layers.LayerNorm2d] = 1
    LAYER_NORMS[timm_layers.LayerNorm] = -1
    # LayerNorms followed by their dropout and activation: norms over the channels, masked after the activation
    LAYER_NORMS[timm_layers.LayerNormAct2d] = 1
    LAYER_NORMS[timm_layers.LayerNormAct] = -1
    # MetaFormer's LayerNorms without β: the same function, β = 0 (cut as the LayerNorm they derive from)
    LAYER_NORMS[metaformer.LayerNorm2dNoBias] = 1
    LAYER_NORMS[metaformer.LayerNormNoBias] = -1
    register_module_handler((timm_layers.LayerNormAct2d, timm_layers.LayerNormAct), norm_act)
    register_rms_and_group_norms()
    layer_norms = (timm_layers.LayerNorm2d, timm_layers.LayerNorm, metaformer.LayerNorm2dNoBias,
                   metaformer.LayerNormNoBias, timm_layers.GroupNorm1, metaformer.GroupNorm1NoBias)  # fmt: skip
    register_module_handler(layer_norms, layer_norm)
    # splits by sizes held in attributes: each part pruned on its own, the sizes set by the cut
    register_split_sizes(timm_fasternet.Partial_conv3, sizes_in("dim_conv3", "dim_untouched"))
    register_split_sizes(timm_inception_next.InceptionDWConv2d, sizes_held_in("split_indexes"))
    register_split_sizes(timm_mambaout.GatedConvBlock, sizes_held_in("split_indices"))
    register_split_sizes((timm_cspnet.CrossStage, timm_cspnet.CrossStage3), halves_of("expand_chs"))
    register_split_sizes(timm_rexnet.LinearBottleneck, first_size_in("in_channels"))
    register_split_sizes(timm_dpn.DualPathBlock, first_size_in("num_1x1_c"))
    register_leaf(timm_layers.LayerScale, channel_dim=-1, follows=("gamma",))
    register_leaf(timm_layers.LayerScale2d, channel_dim=1, follows=("gamma",))
    for leaf in timm_fx.get_notrace_modules():  # timm's own: traced whole, refused where reached unless taught
        LEAVES.setdefault(leaf, lambda module: True)
    AUTOWRAP_FUNCTIONS.extend(f for f in timm_fx.get_notrace_functions() if f not in AUTOWRAP_FUNCTIONS)
