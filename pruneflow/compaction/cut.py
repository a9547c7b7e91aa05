"""Compaction's cut: from a masked network, a physically smaller one with the pruned channels taken out.

It reads the channel graph (``pruneflow.graph``): a channel lives in a **channel space**,
written by its producers and read by its consumers. Cutting channel ``c`` of a space removes

- row ``c`` of every producer's kernel (and bias) — convs, linear layers and the depthwise convs that
  carry the space — and entry ``c`` of its norm (a BatchNorm's γ, β, running mean and variance, a
  LayerNorm's weight, bias and ``normalized_shape``); a grouped
  conv keeps its group count: its space is cut at the same positions in every group, so its rows and
  its input columns (one group's inputs on dim 1) shrink alike in each;
- entry ``offset + c`` of every norm that reads the space among other channels (after a
  concatenation, as DenseNet's pre-activation norms do, or a residual addition, as ConvNeXt's
  LayerNorms do), and of every per-channel parameter multiplied into it (ConvNeXt's ``layer_scale``);
- the columns that read ``c`` in every consumer: a conv's input slice ``weight[:, c]``, a linear
  layer's feature ``c`` or, after a flatten, features ``c·k … (c+1)·k − 1``, shifted by the space's
  offset where it reaches the consumer through a concatenation.

A space **reordered** by a channel shuffle or a ``chunk`` (ShuffleNet's streams; ``ChannelSpace.routes``) is cut
keeping the network's own forward: at the cut widths its shuffles and splits hand each position to other readers
than at the full ones, so each kept channel is placed (rows of its producers, entries of its points, columns of
its consumers, all in one order) on a slot that reaches the same readers; a slot no kept channel can take holds a
zero channel (zero rows, γ = β = 0), so any selection cuts exactly, and the criteria select so that few are needed.

A space split by sizes its owner holds (``ChannelSpace.splits``: FasterNet's partial conv) is cut plainly, each part
keeping its kept channels in order; the cut sets the owner's sizes (``register_split_sizes``) to the channels each
part keeps, recorded in ``sizes`` like an attention's head count.

timm's attention (``ChannelSpace.whole_heads``) loses whole heads: the rows of each cut head's q, k and v from its
``qkv``, its value columns from ``proj``; its ``num_heads`` and ``attn_dim`` are set to the heads kept (``sizes``).

``nn.MultiheadAttention`` (torchvision's ViT) is rebuilt at its input's kept width (``embed_dim``, its head count
kept, ``head_dim`` following): its packed ``in_proj`` keeps the kept q, k, v rows of the kept input columns, its
``out_proj`` is cut as a layer of its own; a number the model reshapes by (its ``hidden_dim``:
``ChannelSpace.held_by``) is set to the kept width.

A Swin attention's q, k, v rows (``ChannelSpace.heads``) are cut as rows of its ``qkv`` and columns of its ``proj``,
the same positions from q and k and as many from every head, as many per head as the attention's input keeps per
head (checked: its head width is its input's width / heads); the attention keeps its head count and divides its
logits by √(its cut head width), as the ``activation`` mask already does in the masked network. MaxViT's attention
reshapes by a head width of its own: the cut sets its ``head_dim`` (a ``sizes`` entry, so a rebuilt model has it),
and keeps its scale, which its constructor fixed from the original width.

This is the same function exactly when channel ``c`` is zero everywhere in its space. An ``activation``
mask makes it so: it multiplies the channel by 0 at every producer's channel point (after β), and the
graph admits between a channel point and a reader only ops that keep a zero channel zero (ReLU, SiLU,
pooling, addition, a product with a zero factor). In a coupled space that needs every producer to mask
``c``; a channel masked by some producers only is still carried by the others, so it is refused with
an error naming the layer. The other strategies leave pruned channels alive — ``weight`` and ``control``
through their kernels, ``gradient``, ``hard`` and ``parametrize`` through β after the activation — so
cutting them changes the function; ``verify`` measures by how much.

(Folding a pruned channel's constant act(β) into its consumer's bias would shrink that gap for a
linear consumer, but not exactly for a padded conv, whose border taps read zeros; it is left out.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from pruneflow.compaction.layouts import lstm_args, lstm_widths, tensor_keep
from pruneflow.compaction.rope import cut_rope_table, fold_scales, kept_frequencies
from pruneflow.errors import ConfigError
from pruneflow.graph import (
    ChannelSpace,
    Consumer,
    UnionFind,
    is_depthwise,
    is_layer_norm,
    norm_width,
    trace_channel_graph,
)
from pruneflow.graph.handlers.timm_layers import register_if_imported
from pruneflow.graph.heads import takes_whole_heads, tied_heads_problem, whole_heads_problem
from pruneflow.graph.layers import LayerNorm2d, RowBlocks, channel_multiplier, input_weight
from pruneflow.graph.registry import MODULE_HANDLERS, ROPE_TABLES, SPLIT_SIZES

log = logging.getLogger(__name__)

MaskLike = Tensor | Sequence[int] | Sequence[bool]

# The per-module hook tables a deep copy inherits; the copy must compute without any of them.
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class CompactionError(ConfigError):
    """A network or mask that cannot be compacted exactly; the message names the layer and why."""


def effective_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` as plain modules: parametrizations baked in, every hook dropped.

    ``parametrize`` masks become plain parameters holding the effective weight (stored ⊙ mask).
    Hooks go because an ``activation`` mask's hook multiplies its channel point by a keep-vector of
    the original width, which fits no compacted tensor and has no place in an exported model. The
    copy is therefore the dense network *without* activation masks: a masked channel's β flows again.
    """
    dense = copy.deepcopy(network)
    for module in list(dense.modules()):
        for table in HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks is not None:
                hooks.clear()
        if parametrize.is_parametrized(module):
            # The deep copy shares the original's injected `Parametrized<Class>`, and removing a
            # parametrization deletes the class's property: the original would lose its `weight`.
            shared = type(module)
            namespace = {key: value for key, value in vars(shared).items() if key not in ("__dict__", "__weakref__")}
            module.__class__ = type(shared.__name__, shared.__bases__, namespace)
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    # A deep-copied parameter keeps its values and requires_grad only, not the attributes the user set on it.
    originals = dict(network.named_parameters())
    for name, parameter in dense.named_parameters():
        owner, _, attribute = name.rpartition(".")
        parametrized = f"{owner}{'.' if owner else ''}parametrizations.{attribute}.original"
        original = originals.get(name, originals.get(parametrized))
        if original is not None:
            carry_parameter_settings(original, parameter)
    return dense


# -- rebuilding modules at a new width ------------------------------------------------------------
def _conv_args(conv: nn.Conv1d | nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
        "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
        "bias": conv.bias is not None, "padding_mode": conv.padding_mode,
    }  # fmt: skip


def _conv_transpose_args(conv: nn.ConvTranspose2d) -> dict[str, Any]:
    return {**_conv_args(conv), "output_padding": conv.output_padding}


def _norm_args(norm: nn.BatchNorm2d) -> dict[str, Any]:
    return {
        "num_features": norm.num_features, "eps": norm.eps, "momentum": norm.momentum, "affine": norm.affine,
        "track_running_stats": norm.track_running_stats,
    }  # fmt: skip


def _layer_norm_args(norm: nn.LayerNorm) -> dict[str, Any]:
    # one normalised dim (the channels): the graph admits no other
    return {"normalized_shape": norm.normalized_shape[0], "eps": norm.eps,
            "elementwise_affine": norm.elementwise_affine, "bias": norm.bias is not None}  # fmt: skip


def _group_norm_args(norm: nn.GroupNorm) -> dict[str, Any]:
    # one group (``SAMPLE_NORMS``): the graph refuses the others
    return {"num_groups": norm.num_groups, "num_channels": norm.num_channels, "eps": norm.eps, "affine": norm.affine,
            "bias": norm.bias is not None}  # fmt: skip


def _linear_args(linear: nn.Linear) -> dict[str, Any]:
    return {"in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None}


def _attention_args(attention: nn.MultiheadAttention) -> dict[str, Any]:
    # keys and values as wide as the query: the graph refuses the others
    return {"embed_dim": attention.embed_dim, "num_heads": attention.num_heads, "dropout": attention.dropout,
            "bias": attention.in_proj_bias is not None, "batch_first": attention.batch_first}  # fmt: skip


# type → (constructor arguments of an instance, its (output, input) width arguments). Exact types only:
# a subclass may compute something else from the same tensors.
RESIZABLE: dict[type[nn.Module], tuple[Callable[[Any], dict[str, Any]], tuple[str, str | None]]] = {
    nn.Conv1d: (_conv_args, ("out_channels", "in_channels")),
    nn.Conv2d: (_conv_args, ("out_channels", "in_channels")),
    # depthwise (its weight (C, 1, k, k) cut by rows as a depthwise conv's) or dense, writing only (``tensor_keep``)
    nn.ConvTranspose2d: (_conv_transpose_args, ("out_channels", "in_channels")),
    nn.BatchNorm1d: (_norm_args, ("num_features", None)),
    nn.BatchNorm2d: (_norm_args, ("num_features", None)),
    nn.Linear: (_linear_args, ("out_features", "in_features")),
    # the linear layer ``nn.MultiheadAttention`` holds as its ``out_proj`` (a name that keeps it unquantized)
    NonDynamicallyQuantizableLinear: (_linear_args, ("out_features", "in_features")),
    # its width is its input's, its q, k, v rows 3 × as many (``cut_multihead_attention``)
    nn.MultiheadAttention: (_attention_args, ("embed_dim", None)),
    nn.LayerNorm: (_layer_norm_args, ("normalized_shape", None)),
    LayerNorm2d: (_layer_norm_args, ("normalized_shape", None)),
    nn.GroupNorm: (_group_norm_args, ("num_channels", None)),
    # its rows are hidden units (four gate rows each, ``compaction.recurrent``), its columns its input's channels
    nn.LSTM: (lstm_args, ("hidden_size", "input_size")),
}


def _taught_norm_args(norm: nn.Module) -> dict[str, Any]:
    return {"normalized_shape": norm.normalized_shape[0]}


def _resizable(name: str, module: nn.Module) -> tuple[Callable[[Any], dict[str, Any]], tuple[str, str | None]]:
    entry = RESIZABLE.get(_rebuilt_as(module))
    if entry is None and is_layer_norm(module):  # taught to the graph with no base compaction builds (an RMS norm)
        return _taught_norm_args, ("normalized_shape", None)
    if entry is None:
        raise CompactionError(
            f"{name} is a {type(module).__name__}; compaction rebuilds only "
            f"{', '.join(cls.__name__ for cls in RESIZABLE)} (exact types, not subclasses), and subclasses the channel "
            "graph has a handler for"
        )
    return entry


def _rebuilt_as(module: nn.Module) -> type[nn.Module]:
    """The type whose constructor gives ``module``'s tensors their shapes: its own, or for a subclass the graph was
    taught (timm's ``BatchNormAct2d``, ``Conv2dSame``: ``register_module_handler``) the nearest base in
    ``RESIZABLE``, whose tensors it takes, its own forward and settings (its activation) kept."""
    if type(module) in RESIZABLE or type(module) not in MODULE_HANDLERS:
        return type(module)
    return next((cls for cls in type(module).__mro__ if cls in RESIZABLE), type(module))


def resized(name: str, module: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A new, uninitialised module like ``module`` with the widths in ``sizes`` (constructor keywords).

    Built on the meta device, then given empty storage: no initialisation runs, so it draws nothing from the random
    number generator. A cut while training would otherwise shift every later dropout and stochastic-depth draw, and
    the cut network would no longer train on as the masked one. A taught subclass (``_rebuilt_as``) is a copy of
    ``module`` given the new module's tensors and widths."""
    arguments, (out_arg, in_arg) = _resizable(name, module)
    if arguments is _taught_norm_args:
        return _resized_taught_norm(module, sizes["normalized_shape"])
    tensor = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    dtype = {} if tensor is None else {"dtype": tensor.dtype}
    base = _rebuilt_as(module)
    new = base(**{**arguments(module), **sizes}, device="meta", **dtype)
    new.to_empty(device=tensor.device if tensor is not None else "cpu")
    new.train(module.training)
    parameters = dict(module.named_parameters())
    for parameter_name, parameter in new.named_parameters():
        carry_parameter_settings(parameters[parameter_name], parameter)
    if base is type(module):
        return new
    like = copy.copy(module)  # its settings and submodules (an activation: no per-channel tensor) kept
    # the new module's tensors and its own (empty) hook tables; a submodule table of its own
    like.__dict__.update({key: value for key, value in vars(new).items() if isinstance(value, dict)})
    like._modules = dict(module._modules)
    for attribute in (out_arg, in_arg, "groups", "normalized_shape", "num_groups"):
        if attribute is not None and hasattr(new, attribute):
            setattr(like, attribute, getattr(new, attribute))
    _own_row_parameters(module, like, out_arg)
    return like


def _own_row_parameters(module: nn.Module, like: nn.Module, out_arg: str) -> None:
    """The parameters a taught subclass adds to its base's, one entry per output row along dim 0 (timm's
    ``ScaledStdConv2d``'s ``gain``), given ``like``'s row count, uninitialised: they are cut with the rows."""
    rows, old_rows = (getattr(m, out_arg) for m in (like, module))
    rows, old_rows = (width[0] if isinstance(width, tuple) else width for width in (rows, old_rows))  # a LayerNorm's
    for name, parameter in module.named_parameters(recurse=False):
        if name in like._parameters or parameter is None:
            continue
        if parameter.ndim == 0 or parameter.shape[0] != old_rows:
            raise CompactionError(f"{name} of a {type(module).__name__} has no entry per output row; compaction "
                                  "cuts only parameters shaped (rows, ...) beside its base's")  # fmt: skip
        shape = (rows, *parameter.shape[1:])
        new = nn.Parameter(torch.empty(shape, device=parameter.device, dtype=parameter.dtype))
        carry_parameter_settings(parameter, new)
        like._parameters[name] = new


def _resized_taught_norm(module: nn.Module, width: int) -> nn.Module:
    """A copy of a norm over the channels that no constructor here builds (timm's ``RmsNorm2d``, ``LAYER_NORMS``),
    ``width`` channels wide: each parameter has one entry per channel, uninitialised; its settings and submodules
    (an activation) kept, hook tables of its own."""
    like = copy.copy(module)
    like.__dict__.update({key: type(value)() for key, value in vars(module).items()
                          if key.startswith("_") and isinstance(value, dict)})  # fmt: skip
    like._modules = dict(module._modules)
    like._buffers = dict(module._buffers)
    for name, parameter in module.named_parameters(recurse=False):
        new = nn.Parameter(torch.empty((width, *parameter.shape[1:]), device=parameter.device, dtype=parameter.dtype))
        carry_parameter_settings(parameter, new)
        like._parameters[name] = new
    for name in module._parameters:  # a parameter registered as None (no γ) stays so
        like._parameters.setdefault(name, None)
    like.normalized_shape = (width,)
    return like


def carry_parameter_settings(old: nn.Parameter, new: nn.Parameter) -> None:
    """What a user can set on a parameter beyond its values, from ``old`` onto its rebuilt ``new``: ``requires_grad``
    (a frozen layer stays frozen through a cut, its checkpoint's restore and ``load_compact``) and the attributes
    the user gave it (``old.__dict__``, e.g. a no-weight-decay tag an optimizer factory reads)."""
    new.requires_grad_(old.requires_grad)
    new.__dict__.update(old.__dict__)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def is_channels_last(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.ndim == 4
        and not weight.is_contiguous()
        and weight.is_contiguous(memory_format=torch.channels_last)
    )


def apply_sizes(model: nn.Module, sizes: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Give the named modules of ``model`` the widths ``sizes`` (``Compaction.sizes``) in place, uninitialised:
    the shape of a compacted model, whose weights load next (a per-channel parameter's entry is its new
    ``channels`` along ``dim``). The one routine that adopts cut widths — for an
    exported model, a checkpoint written after a cut in training, and its restore. A module already at its
    widths stays (its parameters keep their identity); a rebuilt one keeps its memory format (channels-last)."""
    rebuilt = []
    parameters = dict(model.named_parameters())
    register_if_imported()  # a fresh timm model, never traced: its split owners (``SPLIT_SIZES``) are timm's
    for name, widths in sizes.items():
        if name in parameters:
            if resize_parameter(model, name, parameters[name], widths):
                rebuilt.append(name)
            continue
        module = model.get_submodule(name)
        if type(module) in ROPE_TABLES:  # a rope's frequencies, from its full table
            cut_rope_table(module, widths["frequencies"])
            continue
        if sized_by_attributes(module, widths):
            set_attributes(module, widths)
            continue
        arguments, _ = _resizable(name, module)
        if all(arguments(module).get(key) == value for key, value in widths.items()):
            continue
        new = resized(name, module, widths)
        if is_channels_last(module):
            new.to(memory_format=torch.channels_last)
        replace_module(model, name, new)
        rebuilt.append(name)
    if rebuilt:
        log.info("rebuilt at their compacted widths: %s", ", ".join(rebuilt))
    return model


# An attention's sizes the cut sets as attributes (its layers are rebuilt on their own): MaxViT's head width, timm's
# head count and width of all heads (Hiera's ``heads`` and ``dim_out``, MViTv2's ``dim_out``), BEiT's and EVA's fused
# path turned off (``ChannelSpace.unfused_by_cut``); and a width a model reshapes by (``ChannelSpace.held_by``: a
# ViT's hidden_dim, the shape MetaFormer's ``Scale`` views by, EfficientFormerV2's width of all value heads ``dh``;
# TinyViT's head count and ``out_dim``; LeViT's head count and ``val_attn_dim``; TNT's pixel embedding's ``in_dim``;
# MobileNetV5's multi-query attention's ``key_dim`` and ``value_dim``); an attention's ``scale`` whose full width the
# cut folded into its q rows (``compaction.rope.fold_scales``).
ATTENTION_SIZES = {"head_dim", "num_heads", "attn_dim", "heads", "dim_out", "fused_attn", "hidden_dim", "shape", "dh",
                   "out_dim", "val_attn_dim", "in_dim", "scale", "key_dim", "value_dim"}  # fmt: skip


def sized_by_attributes(module: nn.Module, widths: Mapping[str, int]) -> bool:
    """Whether the cut's ``widths`` for ``module`` are attributes it sizes its forward by, not layers to rebuild: an
    attention's head width (MaxViT's) or head count (timm's), a split's sizes (FasterNet's, EfficientViM's
    ``d_inner``), an entry of a list of sizes (FocalNet's)."""
    return set(widths) <= ATTENTION_SIZES or type(module) in SPLIT_SIZES or all("[" in key for key in widths)


def set_attributes(module: nn.Module, sizes: Mapping[str, int]) -> None:
    """Set an attention's sizes; its zero key bias (BEiT's, EVA's ``k_bias``, a buffer concatenated with ``q_bias``
    and ``v_bias``) takes as many entries as its query bias, cut before (``ChannelScale``)."""
    for attribute, size in sizes.items():
        if attribute.endswith("]"):  # an entry of a list of sizes (FocalNet's ``input_split[0]``)
            name, entry = attribute[:-1].split("[")
            held = list(getattr(module, name))
            held[int(entry)] = size
            setattr(module, name, held)
            continue
        held = getattr(module, attribute, None)  # a shape held as a tuple (MetaFormer's ``Scale``): its first size
        if isinstance(size, (tuple, list)):  # a split's sizes held in one tuple (InceptionNeXt's ``split_indexes``)
            setattr(module, attribute, tuple(size))
            continue
        setattr(module, attribute, (size, *held[1:]) if isinstance(held, tuple) else size)
    key_bias, query_bias = getattr(module, "k_bias", None), getattr(module, "q_bias", None)
    if isinstance(key_bias, Tensor) and isinstance(query_bias, Tensor) and key_bias.shape != query_bias.shape:
        module.k_bias = key_bias.new_zeros(query_bias.shape)


def replace_parameter(model: nn.Module, name: str, new: nn.Parameter) -> None:
    owner, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attribute, new)


def resize_parameter(model: nn.Module, name: str, parameter: nn.Parameter, widths: Mapping[str, int]) -> bool:
    """Give the per-channel parameter ``name`` (``ChannelScale``) ``widths["channels"]`` entries along
    ``widths["dim"]``, uninitialised; False where it has them already (it keeps its identity)."""
    shape = list(parameter.shape)
    if shape[widths["dim"]] == widths["channels"]:
        return False
    shape[widths["dim"]] = widths["channels"]
    new = nn.Parameter(torch.empty(shape, device=parameter.device, dtype=parameter.dtype))
    carry_parameter_settings(parameter, new)
    replace_parameter(model, name, new)
    return True


def cut_tensor(tensor: Tensor, out_keep: Tensor | None, in_keep: Tensor | None) -> Tensor:
    """``tensor`` of a module (a parameter, a buffer, or optimizer state shaped like a parameter) with only
    rows ``out_keep`` on dim 0 and columns ``in_keep`` on dim 1 (None: all); scalars as they are."""
    if out_keep is not None and tensor.ndim >= 1:
        tensor = tensor.index_select(0, out_keep.to(tensor.device))
    if in_keep is not None and tensor.ndim >= 2:
        tensor = tensor.index_select(1, in_keep.to(tensor.device))
    return tensor


def takes_whole_groups(module: nn.Module, out_keep: Tensor) -> bool:
    """Whether ``module`` is a grouped conv reading as many channels per group as it writes and ``out_keep`` keeps
    whole groups of its rows: a conv that carries its input's channels group by group (its rows a producer of the
    space it reads, pruned in whole groups: ``ChannelSpace.block``), whose groups go with them. A grouped conv that
    writes a space of its own keeps the same rows in every group, never whole groups."""
    groups = getattr(module, "groups", 1)
    if groups < 2 or module.in_channels != module.out_channels or len(out_keep) % (module.out_channels // groups):
        return False
    kept = torch.zeros(module.out_channels, dtype=torch.bool)
    kept[out_keep] = True
    per_group = kept.view(groups, -1)
    return torch.equal(per_group.all(-1), per_group.any(-1))


def cut_module(name: str, module: nn.Module, out_keep: Tensor | None, in_keep: Tensor | None) -> nn.Module:
    """``module`` keeping only output rows ``out_keep`` and input columns ``in_keep`` (None: all).

    Dim 0 of every tensor is the output (kernel rows, bias, BatchNorm's γ, β and running statistics),
    dim 1 of a weight the input (except where ``tensor_keep`` says otherwise: an LSTM's units, a dense transposed
    conv's weight); scalar buffers (``num_batches_tracked``) are copied as they are. A depthwise conv's row ``c``
    reads input channel ``c`` only: cutting rows cuts its inputs and groups.
    """
    if isinstance(module, nn.MultiheadAttention):
        return cut_multihead_attention(name, module, out_keep, in_keep)
    lstm = isinstance(module, nn.LSTM)  # its rows are hidden units, four gate rows each
    sizes = lstm_widths(module, out_keep, in_keep) if lstm else _widths(name, module, out_keep, in_keep)
    state = {key: cut_tensor(tensor, *tensor_keep(module, key, out_keep, in_keep))
             for key, tensor in module.state_dict().items()}  # fmt: skip
    new = resized(name, module, sizes)
    new.load_state_dict(state)
    return new


def _widths(name: str, module: nn.Module, out_keep: Tensor | None, in_keep: Tensor | None) -> dict[str, int]:
    """The constructor widths of ``module`` keeping output rows ``out_keep`` and input columns ``in_keep``."""
    _, (out_arg, in_arg) = _resizable(name, module)
    sizes = {}
    if out_keep is not None:
        sizes[out_arg] = len(out_keep)
        if is_depthwise(module):
            sizes["in_channels"] = sizes["groups"] = len(out_keep)
        elif in_keep is None and takes_whole_groups(module, out_keep):  # carrying its input (LiteMLA's aggregation)
            sizes["in_channels"] = len(out_keep)
            sizes["groups"] = len(out_keep) // (module.out_channels // module.groups)
        elif channel_multiplier(module) > 1:  # k rows per input channel, cut k at a time (``handlers.multipliers``)
            sizes["in_channels"] = sizes["groups"] = len(out_keep) // channel_multiplier(module)
    if out_keep is not None and isinstance(module, nn.GroupNorm) and module.num_groups > 1:  # ``ChannelSpace.block``
        sizes["num_groups"] = module.num_groups * len(out_keep) // module.num_channels
    if in_keep is not None and in_arg is not None:
        # a grouped conv's weight holds one group's inputs on dim 1; the same columns go from every group
        sizes[in_arg] = len(in_keep) * getattr(module, "groups", 1)
    return sizes


def cut_multihead_attention(
    name: str, attention: nn.MultiheadAttention, rows: Tensor | None, columns: Tensor | None
) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` at its input's kept width (``columns``), its head count kept: its packed ``in_proj``
    keeps the q, k, v ``rows`` of those columns, as many per head; its ``out_proj`` is taken as it is, and cut on its
    own (it writes the stream and reads the value rows), so the two follow the same widths."""
    width = attention.embed_dim if columns is None else len(columns)
    kept_rows = 3 * attention.embed_dim if rows is None else len(rows)
    if kept_rows != 3 * width or width % attention.num_heads:
        raise CompactionError(
            f"cannot cut attention {name}: it would keep {kept_rows} q, k, v rows for an input of {width} channels; "
            f"nn.MultiheadAttention needs 3 × its input's width, a multiple of its {attention.num_heads} heads"
        )
    new = resized(name, attention, {"embed_dim": width})
    with torch.no_grad():
        new.in_proj_weight.copy_(cut_tensor(attention.in_proj_weight, rows, columns))
        if attention.in_proj_bias is not None:
            new.in_proj_bias.copy_(cut_tensor(attention.in_proj_bias, rows, None))
    new.out_proj = attention.out_proj
    return new


# -- channel spaces -------------------------------------------------------------------------------
@dataclass
class ChannelGroup:
    """One channel space of the graph with the channels cut out of it."""

    space: ChannelSpace
    removed: Tensor

    @property
    def names(self) -> list[str]:
        return self.space.names

    @property
    def width(self) -> int:
        return self.space.width

    @property
    def kept(self) -> Tensor:
        keep = torch.ones(self.width, dtype=torch.bool)
        keep[self.removed] = False
        return keep.nonzero().flatten()


def as_mask(name: str, value: MaskLike, width: int) -> Tensor:
    """A boolean mask (True = pruned) from a bool mask or a list of pruned channel indices."""
    tensor = torch.as_tensor(value).detach().cpu().flatten()
    if tensor.dtype == torch.bool:
        if len(tensor) != width:
            raise CompactionError(f"the mask of {name} has {len(tensor)} entries; {name} has {width} output channels")
        return tensor.clone()
    if len(tensor) and tensor.is_floating_point():
        raise CompactionError(f"the mask of {name} must be booleans or channel indices, got {tensor.dtype} values")
    indices = tensor.long()
    bad = indices[(indices < 0) | (indices >= width)]
    if len(bad):
        raise CompactionError(f"the mask of {name} names channels {bad.tolist()} outside 0..{width - 1}")
    mask = torch.zeros(width, dtype=torch.bool)
    mask[indices] = True
    return mask


def plan_cut(network: nn.Module, pruned: Mapping[str, MaskLike]) -> list[ChannelGroup]:
    """The channel spaces of a hook-free ``network`` and the channels to cut from each, checked.

    ``pruned`` maps producer names to masks (True = pruned) or pruned channel indices; a producer
    that is absent prunes nothing. A channel is cut when every producer of its space prunes it; a
    channel pruned by some producers of a space but not all is an error, and so is a cut in a space
    the channel graph refuses (the refusal names why).
    """
    graph = trace_channel_graph(network)
    by_name = {layer.name: layer for layer in graph.layers}
    masks: dict[str, Tensor] = {}
    for name, value in pruned.items():
        layer = by_name.get(name)
        if layer is None:
            raise CompactionError(
                f"the masks name {name!r}, which is not a conv or linear layer of {type(network).__name__}; "
                f"its layers: {', '.join(by_name) or 'none'}"
            )
        masks[name] = as_mask(name, value, layer.num_channels)
    groups = []
    for space in graph.spaces:
        members = space.producers
        member_masks = [masks.get(layer.name, torch.zeros(space.width, dtype=torch.bool)) for layer in members]
        everywhere = torch.stack(member_masks).all(0)
        for layer, mask in zip(members, member_masks, strict=True):
            partial = mask & ~everywhere
            if partial.any():
                others = [other.name for other in members if other is not layer]
                raise CompactionError(
                    f"cannot cut channels {partial.nonzero().flatten().tolist()} of {layer.name}: its channel space "
                    f"is also written by {', '.join(others)}, where they stay alive; a channel is cut only when "
                    "every producer of its space prunes it (select the whole group)"
                )
        if everywhere.all():
            raise CompactionError(f"cannot cut all {space.width} channels of {', '.join(space.names)}")
        if everywhere.any() and not space.prunable:
            raise CompactionError(f"cannot cut channels of {space.name}: {'; '.join(space.refusals)}")
        blocks = everywhere.view(space.groups, -1)
        if not (blocks == blocks[0]).all():
            raise CompactionError(
                f"cannot cut channels {everywhere.nonzero().flatten().tolist()} of {space.name}: a grouped conv "
                f"writes or reads its space in {space.groups} groups of {space.width // space.groups}, and a cut must "
                "take the same positions from every group (the criteria select so)"
            )
        by_norm_group = everywhere.view(-1, space.block)
        if not torch.equal(by_norm_group.all(-1), by_norm_group.any(-1)):
            raise CompactionError(
                f"cannot cut channels {everywhere.nonzero().flatten().tolist()} of {space.name}: a GroupNorm "
                f"normalises it in groups of {space.block} channels, and a cut must take whole groups (the criteria "
                "select so)"
            )
        groups.append(ChannelGroup(space, everywhere.nonzero().flatten()))
    for group in groups:
        if group.space.head_rows:
            _check_heads(group, groups)
    return groups


def _check_heads(group: ChannelGroup, groups: Sequence[ChannelGroup]) -> None:
    """An attention's q, k, v rows cut as the attention computes: the same positions from q and k, as many from
    every head's q/k and v, and as many kept per head as its input keeps channels per head."""
    space, heads = group.space, group.space.heads
    pruned = torch.zeros(space.width, dtype=torch.bool)
    pruned[group.removed] = True
    anchor = next((g for g in groups if g.space is space.tied_to), None)
    untied = space.width // space.parts if space.tied_to is not None else None  # a stream of its own kept whole
    anchor_kept = anchor.width - len(anchor.removed) if anchor is not None else untied
    if space.whole_heads:
        if not takes_whole_heads(space, pruned):
            raise CompactionError(
                f"cannot cut {space.name}: attention {space.heads_of} is cut in whole heads only (its q, k and v rows "
                "together: a narrower head would change its softmax's scale); the criteria select so"
            )
        if space.tied_to is not None and (problem := whole_heads_problem(space, pruned, anchor_kept)):
            raise CompactionError(f"cannot cut {space.name}: {problem}; the criteria select so")
        return
    if pruned.view(space.parts, heads, -1).all(-1).all(0).any():
        raise CompactionError(
            f"cannot cut {space.name}: whole heads are pruned (mask.heads=true), and its attention (torchvision's, "
            "BEiT's, CaiT's) takes its head width from its input's width, so a cut cannot drop heads; evaluate the "
            "masked network (compact=false)"
        )
    problem = tied_heads_problem(space, pruned, anchor_kept)
    if problem:
        raise CompactionError(f"cannot cut {space.name}: {problem}; the criteria select so (mask.groups=true)")


# -- the cut --------------------------------------------------------------------------------------
def _kept(width: int, removed: Sequence[Tensor]) -> Tensor:
    """Indices of ``width`` entries without the ``removed`` ones."""
    keep = torch.ones(width, dtype=torch.bool)
    keep[torch.cat(list(removed))] = False
    return keep.nonzero().flatten()


@dataclass
class Compaction:
    """A compacted network with what was cut: ``sizes`` (constructor widths of every rebuilt module, and
    ``{"channels", "dim"}`` of every cut per-channel parameter) is the plain config that, applied to a fresh
    instance of the original architecture (``apply_sizes``), gives its shape."""

    model: nn.Module
    groups: list[ChannelGroup]
    sizes: dict[str, dict[str, int]]
    # module (or per-channel parameter) name → (output rows kept, input columns kept; None: all) of every
    # rebuilt one: what ``cut_tensor`` needs to carry anything shaped like its parameters (optimizer state) over.
    kept: dict[str, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)
    # module name → (rows, input columns) that are zero channels padding a reordered space's slots (``_placement``):
    # their optimizer state is zeroed too when a cut while training carries it over, so they stay zero
    padding: dict[str, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)
    # a parameter cut along a dim past 1 (a ViT's position embedding, (1, tokens, C)) → (its dim, entries kept)
    kept_along: dict[str, tuple[int, Tensor]] = field(default_factory=dict)

    @property
    def removed(self) -> dict[str, list[int]]:
        """Channels cut, by producer."""
        return {name: group.removed.tolist() for group in self.groups if len(group.removed) for name in group.names}

    @property
    def channels(self) -> tuple[int, int]:
        """(channels before, after), summed over the prunable channel spaces."""
        groups = [g for g in self.groups if g.space.prunable]
        return sum(g.width for g in groups), sum(g.width - len(g.removed) for g in groups)


def compact(network: nn.Module, pruned: Mapping[str, MaskLike]) -> Compaction:
    """A physically smaller copy of ``network`` with the ``pruned`` channels cut out; ``network`` is untouched.

    Raises ``CompactionError`` naming the layer for anything it cannot cut exactly as a structure:
    an unknown reader, a shared module, a partially pruned coupled channel, an unsupported module type.
    """
    model = effective_copy(network)
    groups = plan_cut(model, pruned)
    reordered = [group for group in groups if _reordered(group.space)]
    placement = _placement(model, groups, reordered) if any(len(group.removed) for group in reordered) else None
    result = _cut(model, groups, placement)
    before, after = result.channels
    log.info("compaction: %d of %d channels cut from %d producers", before - after, before, len(result.removed))
    return result


def _cut(model: nn.Module, groups: Sequence[ChannelGroup], placement: _Placement | None = None) -> Compaction:
    """Cut ``groups`` out of ``model`` in place: kept channels in their order, except where ``placement`` (the
    reordered spaces, ``_placement``) gives the rows and columns of a module in its own order (-1: a zero)."""
    modules = dict(model.named_modules())
    out_keep, in_keep, scale_entries = _kept_indices(modules, groups, placement.spaces if placement else set())
    zeros = _place(placement, out_keep, in_keep) if placement is not None else {}
    names = [name for name in modules if name in out_keep or name in in_keep]  # module order: a readable config
    _check_cuttable(modules, names, zeros)  # every module before changing any
    splits = _split_settings(modules, groups)
    sizes = _rebuild(model, modules, names, (out_keep, in_keep), zeros)
    _set_held_widths(model, groups, sizes)
    for owner, attributes in splits.items():
        set_attributes(model.get_submodule(owner), attributes)
        sizes.setdefault(owner, {}).update(attributes)  # beside a width it reshapes by (``held_by``), set above
    kept = {name: (out_keep.get(name), in_keep.get(name)) for name in names}
    kept_along: dict[str, tuple[int, Tensor]] = {}
    _cut_scales(model, scale_entries, kept, sizes, kept_along)
    _set_head_widths(model, groups, sizes)  # after the scales: an attention's key bias follows its cut query bias
    _cut_rope_tables(model, groups, sizes)
    for owner, attributes in fold_scales(model, groups).items():  # after the scales: the cut q_bias
        sizes.setdefault(owner, {}).update(attributes)
        set_attributes(model.get_submodule(owner), attributes)  # its zero k_bias follows the cut q_bias
    return Compaction(model, list(groups), sizes, kept, zeros, kept_along)


Entries = dict[str, list[Tensor]]


def _kept_indices(
    modules: Mapping[str, nn.Module], groups: Sequence[ChannelGroup], placed: set[int]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, tuple[int, list[Tensor]]]]:
    """The rows (producers, norms, points) and input columns (consumers) each module keeps, and the entries cut
    from each per-channel parameter (name → (its dim, entries)), over the groups that are not ``placed``."""
    out_keep: dict[str, Tensor] = {}
    cut_columns: Entries = {}  # a consumer reading a concatenation loses columns of several spaces
    cut_entries: Entries = {}  # and so does a norm reading it
    scale_entries: dict[str, tuple[int, list[Tensor]]] = {}
    for group in groups:
        if not len(group.removed) or id(group.space) in placed:
            continue
        kept = group.kept
        for layer in group.space.producers:
            out_keep[layer.name] = layer.producer.rows(kept) if isinstance(layer.producer, RowBlocks) else kept
            if layer.norm_name is not None:
                out_keep[layer.norm_name] = kept
        for consumer in group.space.consumers:
            cut_columns.setdefault(consumer.name, []).append(consumer.columns(group.removed))
        for point in group.space.points:
            if point.entries:  # one without (a layer over another dim) stays as it is
                cut_entries.setdefault(point.name, []).append(point.channels(group.removed))
        for scale in (*group.space.scales, *group.space.sources):
            scale_entries.setdefault(scale.name, (scale.dim, []))[1].append(scale.channels(group.removed))
    for name, entries in cut_entries.items():
        out_keep[name] = _kept(norm_width(modules[name]), entries)
    in_keep = {name: _kept(input_weight(modules[name]).shape[1], columns) for name, columns in cut_columns.items()}
    return out_keep, in_keep, scale_entries


def _place(
    placement: _Placement, out_keep: dict[str, Tensor], in_keep: dict[str, Tensor]
) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Take the reordered spaces' rows and columns in ``placement``'s order into ``out_keep`` and ``in_keep``; the
    zero channels that pad them, by module: (rows, input columns)."""
    zeros: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for name, order in placement.rows.items():
        out_keep[name], zero_rows = _ordered(order)
        zeros[name] = (zero_rows, zeros.get(name, (None, None))[1])
    for name, order in placement.columns.items():
        in_keep[name], zero_columns = _ordered(order)
        zeros[name] = (zeros.get(name, (None, None))[0], zero_columns)
    return zeros


def _check_cuttable(
    modules: Mapping[str, nn.Module], names: Sequence[str], zeros: Mapping[str, tuple[Tensor | None, Tensor | None]]
) -> None:
    """Refuse a module type the cut cannot rebuild, and a LayerNorm that would read zero channels."""
    for name in names:
        _resizable(name, modules[name])
        zero_rows = zeros.get(name, (None, None))[0]
        if is_layer_norm(modules[name]) and zero_rows is not None and len(zero_rows):
            raise CompactionError(
                f"cannot cut {name}: a LayerNorm reads a reordered space whose cut needs zero channels, which would "
                "change its mean and variance; select with a criterion (it keeps each route within its slots)"
            )


def _rebuild(
    model: nn.Module, modules: Mapping[str, nn.Module], names: Sequence[str],
    keep: tuple[Mapping[str, Tensor], Mapping[str, Tensor]], zeros: Mapping[str, tuple[Tensor | None, Tensor | None]],
) -> dict[str, dict[str, int]]:  # fmt: skip
    """Replace each named module by its cut (``keep``: rows and input columns kept, by module), padding rows and
    columns zeroed; the constructor widths of each, as ``Compaction.sizes`` records them."""
    out_keep, in_keep = keep
    sizes: dict[str, dict[str, int]] = {}
    for name in names:
        new = cut_module(name, modules[name], out_keep.get(name), in_keep.get(name))
        if name in zeros:
            _zero_padding(new, *zeros[name])
        replace_module(model, name, new)
        arguments, (out_arg, in_arg) = _resizable(name, new)
        values = arguments(new)
        grouped_by_input = is_depthwise(new) or channel_multiplier(new) > 1
        width_args = [out_arg, in_arg, "groups"] if grouped_by_input else [out_arg, in_arg]
        width_args += ["num_groups"] if isinstance(new, nn.GroupNorm) else []
        sizes[name] = {arg: int(values[arg]) for arg in width_args if arg is not None}
    return sizes


def _split_settings(modules: Mapping[str, nn.Module], groups: Sequence[ChannelGroup]) -> dict[str, dict[str, int]]:
    """The attributes that make each split by sizes the cut sets (``ChannelSpace.splits``) cut its space into the
    channels each part keeps, by owner; a part left empty, or sizes its owner cannot take, refuse the cut."""
    settings: dict[str, dict[str, int]] = {}
    for group in groups:
        for split in group.space.splits if len(group.removed) else ():
            module, kept = modules[split.owner], split.kept(group.kept)
            owner = f"{type(module).__name__} {split.owner or '(the model)'}"
            try:
                if 0 in kept:
                    raise ValueError("a part would keep no channel")
                attributes = SPLIT_SIZES[type(module)](module, kept)
                if settings.get(split.owner, attributes) != attributes:  # one attribute sizing two spaces' parts
                    raise ValueError(f"it needs {settings[split.owner]} for another space, {attributes} for this one")
                settings[split.owner] = attributes
            except ValueError as exc:
                raise CompactionError(
                    f"cannot cut {group.space.name}: {owner} cannot split it into parts of {kept} channels ({exc}); "
                    "select with a criterion, which keeps each part's share"
                ) from None
    return settings


def _set_head_widths(model: nn.Module, groups: Sequence[ChannelGroup], sizes: dict[str, dict[str, int]]) -> None:
    """MaxViT's attention reshapes its q, k, v by a head width of its own: set it to the cut one. timm's reshapes
    them by its head count and its output by its width: set both to the heads kept. BEiT's and EVA's would scale
    their logits by the cut head width on the fused path: turn it off (``ChannelSpace.unfused_by_cut``)."""
    for group in groups:
        if group.space.whole_heads and len(group.removed):
            attention = model.get_submodule(group.space.heads_of)
            heads = len(group.kept) // group.space.head_unit
            count, width = group.space.head_attributes  # no width: the attention reads it from its input
            head_width = group.space.head_unit // group.space.parts  # a head's q (or k, or v) rows
            sizes[group.space.heads_of] = {count: heads, **({width: heads * head_width} if width else {})}
            set_attributes(attention, sizes[group.space.heads_of])
            continue
        if group.space.heads_of is not None and group.space.block > 1 and len(group.removed):
            _set_block_heads(model, group, sizes)
            continue
        owner = group.space.head_width_of
        if owner is not None and len(group.removed):
            sizes.setdefault(owner, {})["head_dim"] = len(group.kept) // (group.space.parts * group.space.heads)
            model.get_submodule(owner).head_dim = sizes[owner]["head_dim"]
        owner = group.space.unfused_by_cut
        if owner is not None and len(group.removed):
            sizes.setdefault(owner, {})["fused_attn"] = 0  # beside its head width, where it reshapes by one
            set_attributes(model.get_submodule(owner), {"fused_attn": 0})


def _cut_rope_tables(model: nn.Module, groups: Sequence[ChannelGroup], sizes: dict[str, dict[str, Any]]) -> None:
    """Cut each rope table (``ChannelSpace.rope``) to the frequencies its attentions keep, recorded in ``sizes``."""
    try:
        tables = kept_frequencies(groups)
    except ValueError as exc:
        raise CompactionError(f"cannot cut {exc}; select with a criterion, which cuts whole frequencies") from None
    for owner, frequencies in tables.items():
        cut_rope_table(model.get_submodule(owner), frequencies)
        sizes[owner] = {"frequencies": frequencies}


def _set_block_heads(model: nn.Module, group: ChannelGroup, sizes: dict[str, dict[str, int]]) -> None:
    """An attention whose heads' rows lie side by side, pruned in whole blocks of them (TinyViT's): its head count
    and the width of all its heads' values, each the kept share of what it was; a bias table it cached from the rows
    of every head is dropped (rebuilt from the cut one)."""
    attention = model.get_submodule(group.space.heads_of)
    count, width = group.space.head_attributes
    heads = len(group.kept) // group.space.block
    before = group.space.width // group.space.block
    sizes[group.space.heads_of] = {count: heads, width: getattr(attention, width) * heads // before}
    set_attributes(attention, sizes[group.space.heads_of])
    if isinstance(getattr(attention, "attention_bias_cache", None), dict):
        attention.attention_bias_cache = {}


def _set_held_widths(model: nn.Module, groups: Sequence[ChannelGroup], sizes: dict[str, dict[str, int]]) -> None:
    """Set each attribute holding a cut space's width as a number (``ChannelSpace.held_by``) to the kept width, or
    to its share per block where it holds one block's (a head's) width."""
    for group in groups:
        for owner, attribute, *blocks in group.space.held_by if len(group.removed) else ():
            sizes.setdefault(owner, {})[attribute] = len(group.kept) // (blocks[0] if blocks else 1)
            set_attributes(model.get_submodule(owner), {attribute: sizes[owner][attribute]})


def _cut_scales(
    model: nn.Module, scale_entries: Mapping[str, tuple[int, list[Tensor]]],
    kept: dict[str, tuple[Tensor | None, Tensor | None]], sizes: dict[str, dict[str, int]],
    kept_along: dict[str, tuple[int, Tensor]],
) -> None:  # fmt: skip
    """Cut the per-channel parameters (ConvNeXt's ``layer_scale``, a ViT's ``pos_embed``) along their channel dim,
    recording what each keeps in ``kept`` (or ``kept_along``, a dim past 1) and its width in ``sizes``."""
    parameters = dict(model.named_parameters())
    for name, (dim, entries) in scale_entries.items():
        parameter = parameters[name]
        keep = _kept(parameter.shape[dim], entries)
        if dim < 2:
            kept[name] = (keep, None) if dim == 0 else (None, keep)  # rows or columns: as ``cut_tensor`` takes them
        else:  # a source along its tokens' channels (a ViT's position embedding, (1, tokens, C))
            kept_along[name] = (dim, keep)
        new = nn.Parameter(parameter.detach().index_select(dim, keep.to(parameter.device)).clone())
        carry_parameter_settings(parameter, new)
        replace_parameter(model, name, new)
        sizes[name] = {"channels": len(keep), "dim": dim}


# -- reordered spaces: a cut that keeps the network's own channel shuffles and splits -----------------
def _reordered(space: ChannelSpace) -> bool:
    """Whether ``space`` reaches a reader reordered by position (a channel shuffle, a ``chunk``), not only split by
    sizes the cut sets."""
    return space.reordered and bool(space.routes)


@dataclass
class _Placement:
    """Where the reordered spaces' kept channels go in the cut network: ``rows`` (a producer's, its norm's, a
    point's entries) and ``columns`` (a consumer's inputs) as original indices in the cut's order, -1 for a
    zero channel that pads a slot no kept channel can take; ``spaces`` the ids of the spaces placed so."""

    rows: dict[str, list[int]]
    columns: dict[str, list[int]]
    spaces: set[int]


def _readers(space: ChannelSpace) -> dict[str, tuple[str, list[int]]]:
    """Every module reading ``space`` → ("columns" or "rows", the position of each of its channels there, -1:
    not read there)."""
    readers: dict[str, tuple[str, list[int]]] = {}
    for reader in (*space.consumers, *space.points):
        kind = "columns" if isinstance(reader, Consumer) else "rows"
        if isinstance(reader, Consumer) and reader.kind == "grouped":
            raise CompactionError(f"cannot cut {space.name}: grouped conv {reader.name} reads it reordered")
        if isinstance(reader, Consumer) and reader.features_per_channel != 1:
            raise CompactionError(f"cannot cut {space.name}: {reader.name} reads it flattened and reordered")
        at = list(reader.at) if reader.at else [reader.offset + c for c in range(space.width)]
        readers[reader.name] = (kind, at)
    if space.scales:
        raise CompactionError(f"cannot cut {space.name}: a per-channel parameter reads it reordered")
    return readers


def _placement(model: nn.Module, groups: Sequence[ChannelGroup], reordered: Sequence[ChannelGroup]) -> _Placement:
    """Place the reordered spaces' kept channels so that the cut network, running the model's own forward (its
    ``chunk``s and shuffles at the cut widths), hands each of them to the very modules that read it in the
    masked network.

    Each channel has a **route**: the modules that read it. Traced at trial widths (``trace_channel_graph`` with
    ``widths``: each reordered space as many slots as it keeps, the same for spaces that share a reader and a
    width, as a shuffled stream's producers must), every slot of the cut network has a route too; a space's kept
    channels take the slots of their route, in order. Where a route has fewer slots than kept channels, the
    widths grow by one, up to the original ones, where every channel has its own slot. Slots left over hold zero
    channels (zero kernel rows, γ = β = 0), so the cut network computes the masked one exactly at any selection;
    the criteria select so that few are needed (``Criterion.select``, ``route_slots``)."""
    spaces = {id(group.space): group for group in reordered}
    orders, trial = _fit_slots(model, spaces)
    rows: dict[str, list[int]] = {}
    columns: dict[str, list[int]] = {}
    for key, group in spaces.items():
        order = orders[key]  # slot → original channel, -1: a zero channel
        for layer in group.space.producers:
            rows[layer.name] = order
            if layer.norm_name is not None:
                rows[layer.norm_name] = order
        original = _readers(group.space)
        for name, (kind, slot_positions) in _readers(trial[group.space.name]).items():
            target = rows if kind == "rows" else columns
            placed = target.setdefault(name, [])
            placed.extend([-1] * (max(slot_positions) + 1 - len(placed)))
            for slot, position in enumerate(slot_positions):
                if position >= 0 and order[slot] >= 0:
                    placed[position] = original[name][1][order[slot]]
    names = {group.space.name for group in spaces.values()}
    for space in trial.values():  # a reader's other inputs would be taken for zero channels
        readers = {c.name for c in space.consumers} & set(columns) | {p.name for p in space.points} & set(rows)
        if readers and space.name not in names:
            raise CompactionError(
                f"cannot cut {', '.join(sorted(readers))}: it reads {space.name} beside channels reordered by a shuffle"
            )
    return _Placement(rows, columns, set(spaces))


def _fit_slots(
    model: nn.Module, spaces: Mapping[int, ChannelGroup]
) -> tuple[dict[int, list[int]], dict[str, ChannelSpace]]:
    """The smallest widths at which every reordered space's kept channels find slots on their routes, growing a
    family of spaces (those sharing a reader and a width) by one until they do: each space's slot → channel order
    (``_match``) and the graph traced at those widths."""
    readers_of = {key: set(_readers(group.space)) for key, group in spaces.items()}
    family: UnionFind[int] = UnionFind()  # spaces cut to one width: a shuffled stream's producers
    for key in spaces:
        family.add(key)
    for a in spaces:
        for b in spaces:
            if a < b and readers_of[a] & readers_of[b] and spaces[a].width == spaces[b].width:
                family.union(a, b)
    root = family.root
    slots = {key: len(group.kept) for key, group in spaces.items()}
    for key in spaces:
        slots[root(key)] = max(slots[root(key)], slots[key])
    for key in spaces:
        slots[key] = slots[root(key)]
    while True:
        widths = {name: slots[key] for key, group in spaces.items() for name in group.space.names}
        trial = {space.name: space for space in trace_channel_graph(model, widths).spaces}
        orders = {key: _match(group, trial.get(group.space.name)) for key, group in spaces.items()}
        short = {root(key) for key, order in orders.items() if order is None}
        if not short:
            return {key: order for key, order in orders.items() if order is not None}, trial
        growing = [key for key in spaces if root(key) in short and slots[key] < spaces[key].width]
        if not growing:
            names = ", ".join(spaces[key].space.name for key in spaces if root(key) in short)
            raise CompactionError(f"cannot place the kept channels of {names} in a cut keeping the network's shuffles")
        for key in growing:
            slots[key] += 1


def _match(group: ChannelGroup, trial: ChannelSpace | None) -> list[int] | None:
    """Slot → the kept channel of ``group`` on the slot's route, in order (-1: a zero channel); None if a route
    has fewer slots than kept channels, or the space is not traced at the trial widths."""
    if trial is None:
        return None

    def routes(readers: Mapping[str, tuple[str, list[int]]], width: int) -> list[tuple[str, ...]]:
        return [tuple(sorted(name for name, (_, at) in readers.items() if at[c] >= 0)) for c in range(width)]

    channel_routes_ = routes(_readers(group.space), group.width)
    waiting: dict[tuple[str, ...], list[int]] = {}
    for channel in group.kept.tolist():
        waiting.setdefault(channel_routes_[channel], []).append(channel)
    order = []
    for route in routes(_readers(trial), trial.width):
        queue = waiting.get(route)
        order.append(queue.pop(0) if queue else -1)
    return None if any(waiting.values()) else order


def _ordered(order: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Indices to take (a zero channel takes index 0, then is zeroed) and where the zero channels are."""
    indices = torch.tensor(order, dtype=torch.long)
    return indices.clamp_min(0), (indices < 0).nonzero().flatten()


@torch.no_grad()
def _zero_padding(module: nn.Module, rows: Tensor | None, columns: Tensor | None) -> None:
    """Make a cut module's padding rows (and input columns) zero channels: zero kernel rows and bias, a norm's
    γ = β = 0 and running statistics (0, 1), so a padding channel is 0 wherever it goes."""
    if rows is not None and len(rows):
        for tensor in module.parameters():
            tensor.index_fill_(0, rows, 0.0)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_mean is not None:
            module.running_mean.index_fill_(0, rows, 0.0)
            module.running_var.index_fill_(0, rows, 1.0)
    if columns is not None and len(columns) and getattr(module, "weight", None) is not None and module.weight.ndim >= 2:
        module.weight.index_fill_(1, columns, 0.0)
