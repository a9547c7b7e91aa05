"""Masking strategies: how a selected channel is removed, and what keeps it removed while training goes on.

One small interface, one short class per strategy (as ``torch.nn.utils.prune`` does for methods):

- ``prepare``: at setup, before the first forward and before a checkpoint's weights load: install
  the forward-pass machinery with nothing pruned (a mask of ones in a buffer), so parameter and
  buffer names never depend on whether pruning has happened, and pruning later only rewrites buffer
  values (a compiled graph is neither broken nor recompiled);
- ``apply``: at each pruning event, with the layer's full boolean mask (True = pruned): zero the
  kernels (where the strategy does) and ``install`` (update) the masking machinery; a resumed run
  only ``install``s, since its weights come from the checkpoint;
- ``before_optimizer_step``: after backward, before the step (gradient masking);
- ``after_optimizer_step``: after the step (re-zeroing);
- ``trainable_tensors``: the leaf parameters the optimizer moves for the producer (for resetting
  optimizer state) and ``stored_weight``: the stored weight when it differs from the effective one;
- ``remove``: undo hooks and parametrizations.

Why they differ (∂L/∂W of a conv is input ⊗ ∂L/∂output, independent of W):
``weight`` zeroes the kernel once and the next gradient moves it again; ``gradient`` and ``hard``
fight the gradient every step but leave the optimizer's momentum/moments and the BatchNorm's β
alone; ``parametrize`` keeps the effective weight at zero while the stored weight drifts;
``activation`` multiplies the channel by 0 at its channel point, so ∂L/∂output — and hence the
kernel's gradient — is exactly zero.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle
from torchvision.models.swin_transformer import shifted_window_attention

from pruneflow.errors import ConfigError
from pruneflow.graph import LAYER_NORMS, ChannelSource, PrunableLayer, is_layer_norm
from pruneflow.graph.layers import (
    RMS_NORMS,
    held_by,
    kernel_row_mask,
    kernel_tensors,
    statistics_dims,
    tensor_names,
)
from pruneflow.graph.registry import ROWS_MASKED_FORWARDS


def _keep_shape(pruned: Tensor, ndim: int) -> Tensor:
    """A float keep-mask (1 = keep, 0 = pruned) shaped to broadcast over a tensor of ``ndim`` dims on dim 0."""
    return (~pruned).to(torch.float32).view(-1, *([1] * (ndim - 1)))


class MaskStrategy:
    """Base strategy: selected channels get their producing kernels zeroed, nothing else."""

    name: ClassVar[str]
    zeroes_kernels: ClassVar[bool] = True
    # Where pruned channels stay alive in the forward pass (their kernels, or β after a zeroed conv), cutting
    # them out changes the network's function; None where the cut is exact, else why it is not.
    why_cut_changes_outputs: ClassVar[str | None] = "its pruned channels stay alive"
    # True where ``install`` changes the forward pass (hooks, parametrizations): ``prepare`` installs it at setup.
    acts_in_forward: ClassVar[bool] = False

    def prepare(self, layer: PrunableLayer) -> None:
        """Install the forward-pass machinery with nothing pruned (multiplying by ones is exact)."""
        if self.acts_in_forward:
            self.install(layer, torch.zeros(layer.num_channels, dtype=torch.bool))

    def apply(self, layer: PrunableLayer, pruned: Tensor) -> None:
        if self.zeroes_kernels:
            zero_rows(self.trainable_tensors(layer), kernel_row_mask(layer.producer, pruned))
            zero_sources(layer, pruned)
        self.install(layer, pruned)

    def install(self, layer: PrunableLayer, pruned: Tensor) -> None:
        """Put (or update) whatever keeps acting on the layer after pruning; nothing for most strategies."""

    def before_optimizer_step(self, layer: PrunableLayer, pruned: Tensor) -> None:
        """Called after backward and before the optimizer step."""

    def after_optimizer_step(self, layer: PrunableLayer, pruned: Tensor) -> None:
        """Called after the optimizer step."""

    def trainable_tensors(self, layer: PrunableLayer) -> list[nn.Parameter]:
        """The producer's leaf parameters whose rows are the pruned kernels (weight, and bias if any; an LSTM's
        tensors, whose rows ``kernel_row_mask`` gives)."""
        return kernel_tensors(layer.producer)

    def stored_weight(self, layer: PrunableLayer) -> Tensor | None:
        """The stored weight where it differs from the effective ``conv.weight``; else None."""
        return None

    def remove(self, layer: PrunableLayer) -> None:
        """Undo whatever ``apply`` installed (hooks, parametrizations)."""


@torch.no_grad()
def zero_rows(tensors: list[Tensor], pruned: Tensor) -> None:
    for tensor in tensors:
        tensor.mul_(_keep_shape(pruned, tensor.ndim).to(tensor.device, tensor.dtype))


def source_tensor(source: ChannelSource) -> Tensor:
    """The stored parameter of a source (``ChannelSource``): its ``original`` where it is masked by a
    parametrization."""
    if parametrize.is_parametrized(source.owner, source.attribute):
        return source.owner.parametrizations[source.attribute].original
    return getattr(source.owner, source.attribute)


def source_entries(source: ChannelSource, pruned: Tensor) -> Tensor:
    """The entries of ``source``'s channel dim that carry the ``pruned`` channels of its space."""
    return source.channels(pruned.nonzero().flatten().to(source_tensor(source).device))


@torch.no_grad()
def zero_sources(layer: PrunableLayer, pruned: Tensor) -> None:
    """Zero the pruned channels' entries of the parameters that write the layer's space themselves (a ViT's
    position embedding and class token), as a kernel's rows are zeroed."""
    for source in layer.space.sources if layer.space is not None else []:
        tensor = source_tensor(source)
        tensor.index_fill_(source.dim, source_entries(source, pruned), 0.0)


class NoMask(MaskStrategy):
    """The control (``mask=control``): channels are selected and measured, nothing is applied."""

    name = "control"
    why_cut_changes_outputs = "nothing is applied: the pruned channels carry their full activations"
    zeroes_kernels = False


class WeightMask(MaskStrategy):
    """Zero the selected kernels once (the naive way); the gradient is free to move them again."""

    name = "weight"
    why_cut_changes_outputs = "the gradient moves the zeroed kernels again"


class GradientMask(MaskStrategy):
    """Zero the kernels, then zero their gradient before every step.

    Momentum buffers / Adam moments gathered before pruning and coupled weight decay still move them.
    """

    name = "gradient"
    why_cut_changes_outputs = "momentum and β keep the pruned channels alive"

    def before_optimizer_step(self, layer: PrunableLayer, pruned: Tensor) -> None:
        grads = [tensor.grad for tensor in self.trainable_tensors(layer) if tensor.grad is not None]
        zero_rows(grads, kernel_row_mask(layer.producer, pruned))


class HardMask(MaskStrategy):
    """Zero the kernels again after every optimizer step: zero when measured, moved within each step."""

    name = "hard"
    why_cut_changes_outputs = "β leaks through every pruned channel after its BatchNorm"

    def after_optimizer_step(self, layer: PrunableLayer, pruned: Tensor) -> None:
        zero_rows(self.trainable_tensors(layer), kernel_row_mask(layer.producer, pruned))


class ChannelMaskParametrization(nn.Module):
    """effective = stored ⊙ keep, with ``keep`` broadcast over a kernel (or bias) row."""

    def __init__(self, keep: Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, stored: Tensor) -> Tensor:
        return stored * self.keep


class ParametrizeMask(MaskStrategy):
    """``torch.nn.utils.parametrize``: effective weight = stored ⊙ mask, as ``torch.nn.utils.prune`` and
    Lightning's ``ModelPruning`` do. The effective weight is exactly zero; the stored one is not held.
    """

    name = "parametrize"
    why_cut_changes_outputs = "β leaks through every pruned channel after its BatchNorm"
    zeroes_kernels = False
    acts_in_forward = True

    def install(self, layer: PrunableLayer, pruned: Tensor) -> None:
        holder = held_by(layer.producer)
        names = self._tensor_names(layer)
        if not all(name in holder._parameters or parametrize.is_parametrized(holder, name) for name in names):
            raise ConfigError(
                f"mask=parametrize cannot mask {layer.name}: its rows are not dim 0 of its module's parameters (a "
                f"{type(layer.producer).__name__}: an LSTM's gate rows, a transposed conv's dim 1, a layer's row "
                "blocks); choose mask=activation"
            )
        for tensor_name in names:
            if parametrize.is_parametrized(holder, tensor_name):
                keep = holder.parametrizations[tensor_name][0].keep
                keep.copy_(_keep_shape(pruned, keep.ndim))
            else:
                stored = getattr(holder, tensor_name)
                keep = _keep_shape(pruned, stored.ndim).to(stored.device, stored.dtype)
                parametrize.register_parametrization(holder, tensor_name, ChannelMaskParametrization(keep))

    def trainable_tensors(self, layer: PrunableLayer) -> list[nn.Parameter]:
        parametrizations = getattr(held_by(layer.producer), "parametrizations", None)
        if parametrizations is None:
            return super().trainable_tensors(layer)
        return [parametrizations[name].original for name in self._tensor_names(layer) if name in parametrizations]

    def stored_weight(self, layer: PrunableLayer) -> Tensor | None:
        parametrizations = getattr(held_by(layer.producer), "parametrizations", None)
        return None if parametrizations is None else parametrizations[self._tensor_names(layer)[0]].original

    def remove(self, layer: PrunableLayer) -> None:
        holder = held_by(layer.producer)
        for tensor_name in self._tensor_names(layer):
            if parametrize.is_parametrized(holder, tensor_name):
                parametrize.remove_parametrizations(holder, tensor_name, leave_parametrized=True)

    @staticmethod
    def _tensor_names(layer: PrunableLayer) -> list[str]:
        """The producer's weight and bias as the module holding them names them (``held_by``)."""
        weight, bias = tensor_names(layer.producer)
        return [weight] if layer.producer.bias is None else [weight, bias]


KEEP_BUFFER = "pruneflow_keep"


def mask_channels(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook at a channel point: ``output ⊙ keep``, ``keep`` a buffer of the module shaped like
    ``PrunableLayer.channel_shape``.

    A buffer, not a Python-side value: it moves with the module to its device, and a compiled graph
    reads it as an input, so pruning rewrites its values without breaking or recompiling the graph.
    In place: neither BatchNorm's nor a conv's backward reads its own output, so autograd allows it,
    and the eager hot path saves an activation-sized allocation per masked layer.
    """
    if isinstance(output, tuple):  # ``nn.MultiheadAttention``'s (output, weights): the weights carry no channel
        output[0].mul_(getattr(module, KEEP_BUFFER).to(output[0].dtype))
        return output
    return output.mul_(getattr(module, KEEP_BUFFER).to(output.dtype))


def mask_layer_norm(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook at a LayerNorm over channels (``LAYER_NORMS``) reading a masked space: the layer norm of its
    input over the kept channels only, times ``keep``. Masking its output alone would not do: the norm's mean
    and variance would still count the pruned channels' zeros, which the cut network's smaller norm does not. A
    norm over the whole sample (timm's ``GroupNorm1``: ``SAMPLE_NORMS``) counts every position of the kept channels.
    The input's pruned channels are multiplied out of the statistics too, so nothing reaches them backwards.
    No branch on values, the keep-vector a buffer (see ``mask_channels``): a compiled graph reads it as an input.
    """
    keep = getattr(module, KEEP_BUFFER).to(output.dtype)
    dims = statistics_dims(module, inputs[0].ndim)
    channel_dim = LAYER_NORMS[type(module)] % inputs[0].ndim
    # a norm over the whole sample (GroupNorm1) counts every position of each kept channel
    kept = keep.sum().clamp_min(1.0) * math.prod(inputs[0].shape[d] for d in dims if d != channel_dim)
    inputs_kept = inputs[0] * keep
    centred = inputs_kept  # an RMS norm takes no mean: the root of the kept channels' mean square is the cut norm's
    if type(module) not in RMS_NORMS:
        centred = (inputs_kept - inputs_kept.sum(dims, keepdim=True) / kept) * keep
    variance = centred.square().sum(dims, keepdim=True) / kept
    normalised = centred * torch.rsqrt(variance + module.eps)
    if module.weight is not None:
        normalised = normalised * module.weight.view(keep.shape)
    if getattr(module, "bias", None) is not None:  # an RMS norm has no β
        normalised = normalised + module.bias.view(keep.shape)
    for after in (getattr(module, name, None) for name in ("drop", "act")):  # timm's LayerNormAct: before the mask
        if after is not None:
            normalised = after(normalised)
    return normalised * keep


QKV_KEEP_BUFFER = "pruneflow_keep_qkv"


def qkv_rows(keep: Tensor, heads: int) -> Tensor:
    """What an attention's q, k, v rows are multiplied by where ``keep`` (1 = kept) masks them: 0 for a pruned row,
    √(d/d') for a kept query row of a head keeping d' of its d positions (the cut head divides its logits by √d',
    the masked one by √d), 1 for the other kept rows. No branch on values (see ``mask_channels``)."""
    per_head = keep.view(3, heads, -1)
    width = per_head.shape[-1]
    temperature = (width / per_head[0].sum(-1, keepdim=True).clamp_min(1.0)).sqrt().expand_as(per_head[0])
    return keep * torch.cat([temperature.unsqueeze(0), torch.ones_like(per_head[1:])]).flatten()


def mask_multihead_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """Forward hook at an ``nn.MultiheadAttention`` whose q, k, v rows are pruned: the attention computed again (its
    own function, ``F.multi_head_attention_forward``) with its packed ``in_proj`` rows times ``qkv_rows``, as
    ``mask_window_attention`` does for Swin's; the mask of its output's channels applied too, whichever hook runs
    first."""
    rows = qkv_rows(getattr(module, QKV_KEEP_BUFFER), module.num_heads)
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip
    given = {**dict(zip(names, args, strict=False)), **kwargs}
    query, key, value = given["query"], given["key"], given["value"]
    batched_first = module.batch_first and query.dim() == 3
    if batched_first:  # as ``nn.MultiheadAttention.forward``: the function takes (tokens, batch, channels)
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    bias = None if module.in_proj_bias is None else module.in_proj_bias * rows.to(module.in_proj_bias.dtype)
    attended, weights = F.multi_head_attention_forward(
        query, key, value, module.embed_dim, module.num_heads,
        module.in_proj_weight * rows.to(module.in_proj_weight.dtype).view(-1, 1), bias, module.bias_k, module.bias_v,
        module.add_zero_attn, module.dropout, module.out_proj.weight, module.out_proj.bias, training=module.training,
        key_padding_mask=given.get("key_padding_mask"), need_weights=given.get("need_weights", True),
        attn_mask=given.get("attn_mask"), average_attn_weights=given.get("average_attn_weights", True),
        is_causal=given.get("is_causal", False),
    )  # fmt: skip
    attended = attended.transpose(0, 1) if batched_first else attended
    output_keep = getattr(module, KEEP_BUFFER, None)
    return (attended if output_keep is None else attended * output_keep.to(attended.dtype), weights)


def mask_window_attention(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook at a Swin attention whose q, k, v rows are pruned: the attention computed again with those rows
    (weights and biases) times 0, so a pruned position is 0 in every head and nothing reaches its rows backwards;
    a mask of the output's own channels (``mask_channels``, the ``proj`` space) is applied too, in whichever order
    the two hooks run. The attention divides its logits by √d, d its head width as its input's width gives it; the
    cut network's heads keep d' positions each and divide by √d', so the kept query rows are multiplied by
    √(d/d') here: the masked network computes the cut one's function of every kept weight, gradients included,
    and a cut while training trains on as the masked network would. No branch on values (see ``mask_channels``)."""
    rows = qkv_rows(getattr(module, QKV_KEEP_BUFFER), module.num_heads)
    qkv_bias = None if module.qkv.bias is None else module.qkv.bias * rows.to(module.qkv.bias.dtype)
    recomputed = shifted_window_attention(
        inputs[0],
        module.qkv.weight * rows.to(module.qkv.weight.dtype).view(-1, 1),
        module.proj.weight,
        module.get_relative_position_bias(),
        module.window_size,
        module.num_heads,
        shift_size=module.shift_size,
        attention_dropout=module.attention_dropout,
        dropout=module.dropout,
        qkv_bias=qkv_bias,
        proj_bias=module.proj.bias,
        training=module.training,
    )
    output_keep = getattr(module, KEEP_BUFFER, None)
    return recomputed if output_keep is None else recomputed * output_keep.to(recomputed.dtype)


def mask_recomputed_attention(
    module: nn.Module, inputs: tuple[Tensor, ...], keywords: dict[str, Any], output: Tensor
) -> Tensor:
    """Forward hook at an attention that reads its q/k/v rows' weights itself (BEiT's, EVA's and SwinV2's
    ``F.linear`` with q and v biases): computed again with those rows times 0 (``ROWS_MASKED_FORWARDS``, the
    graph's), with the arguments it was called with (SwinV2's ``mask=``), so a pruned row is 0 in every head and
    nothing reaches it backwards; its output's own mask too, as for Swin's."""
    recomputed = ROWS_MASKED_FORWARDS[type(module)](module, inputs, keywords, getattr(module, QKV_KEEP_BUFFER))
    output_keep = getattr(module, KEEP_BUFFER, None)
    return recomputed if output_keep is None else recomputed * output_keep.to(recomputed.dtype)


def mask_source(source: ChannelSource, pruned: Tensor) -> None:
    """Multiply a source parameter (``ChannelSource``) by its keep mask, a parametrization installed once and
    updated after: its pruned entries are 0 in the forward and get no gradient, wherever the parameter is read.
    One keep mask per parameter, shared by the spaces it writes (each its own entries)."""
    stored = source_tensor(source)
    if not parametrize.is_parametrized(source.owner, source.attribute):
        shape = [1] * stored.ndim
        shape[source.dim] = stored.shape[source.dim]
        keep = torch.ones(shape, device=stored.device, dtype=stored.dtype)
        parametrize.register_parametrization(source.owner, source.attribute, ChannelMaskParametrization(keep))
    keep = source.owner.parametrizations[source.attribute][0].keep
    entries = source.channels(torch.arange(len(pruned), device=keep.device))
    keep.view(-1)[entries] = (~pruned).to(keep)


class ActivationMask(MaskStrategy):
    """Zero the kernels and multiply the channel by 0 at its channel point (after the BatchNorm, so β
    cannot leak). Nothing downstream sees the channel, so ∂L/∂kernel is exactly zero. A LayerNorm over
    channels is recomputed over the kept channels (``mask_layer_norm``), as the cut network computes it.
    """

    name = "activation"
    acts_in_forward = True
    why_cut_changes_outputs = None

    def __init__(self) -> None:
        self._handles: dict[str, RemovableHandle] = {}

    def install(self, layer: PrunableLayer, pruned: Tensor) -> None:
        point = layer.channel_point
        keep = (~pruned).to(torch.float32).view(layer.channel_shape)
        if layer.inside_unit:  # an attention's q, k, v rows: the attention is computed again without them
            if layer.name in self._handles:
                getattr(point, QKV_KEEP_BUFFER).copy_(keep)
            else:
                point.register_buffer(QKV_KEEP_BUFFER, keep.to(layer.producer.weight.device), persistent=False)
                if isinstance(point, nn.MultiheadAttention):  # its query, key and value may come by keyword
                    self._handles[layer.name] = point.register_forward_hook(mask_multihead_attention, with_kwargs=True)
                elif type(point) in ROWS_MASKED_FORWARDS:  # computed again with the keywords it is called with
                    self._handles[layer.name] = point.register_forward_hook(mask_recomputed_attention, with_kwargs=True)
                else:
                    self._handles[layer.name] = point.register_forward_hook(mask_window_attention)
            return
        if layer.name in self._handles:
            getattr(point, KEEP_BUFFER).copy_(keep)
        else:
            self._hook(layer.name, point, keep.to(layer.producer.weight.device))
        # Norms reading the space among other channels (after a concatenation) write β into it again: each
        # masks the space's slice of one keep-vector it shares with the other spaces it reads.
        for extra in layer.space.points if layer.space is not None else []:
            if extra.name not in self._handles:
                self._hook(extra.name, extra.module, torch.ones(extra.shape, device=layer.producer.weight.device))
            shared = getattr(extra.module, KEEP_BUFFER).view(-1)
            channels, entries = extra.placed(len(pruned))
            shared[entries.to(shared.device)] = keep.flatten()[channels].to(shared)
        for source in layer.space.sources if layer.space is not None else []:
            mask_source(source, pruned)

    def _hook(self, key: str, point: nn.Module, keep: Tensor) -> None:
        # Not persistent: checkpoints keep the model's own keys; the callback's state holds the masks.
        point.register_buffer(KEEP_BUFFER, keep, persistent=False)
        # Registered at setup (``prepare``), before the telemetry's hook, so it runs first by order alone:
        # ``prepend=True`` reorders the hook dict, which Dynamo guards by position on torch 2.7-2.13
        # (pytorch/pytorch#160083: ``compile=true`` then fails while building a guard).
        self._handles[key] = point.register_forward_hook(mask_layer_norm if is_layer_norm(point) else mask_channels)

    def remove(self, layer: PrunableLayer) -> None:
        if layer.inside_unit:
            handle = self._handles.pop(layer.name, None)
            if handle is not None:
                handle.remove()
                delattr(layer.channel_point, QKV_KEEP_BUFFER)
            return
        for source in layer.space.sources if layer.space is not None else []:
            if parametrize.is_parametrized(source.owner, source.attribute):
                parametrize.remove_parametrizations(source.owner, source.attribute, leave_parametrized=True)
        points = [(layer.name, layer.channel_point)]
        points += [(extra.name, extra.module) for extra in (layer.space.points if layer.space is not None else [])]
        for key, point in points:
            handle = self._handles.pop(key, None)
            if handle is not None:
                handle.remove()
                delattr(point, KEEP_BUFFER)


STRATEGIES: dict[str, type[MaskStrategy]] = {
    cls.name: cls for cls in (NoMask, WeightMask, ActivationMask, GradientMask, ParametrizeMask, HardMask)
}


# Former strategy names, accepted for one release with a FutureWarning: "none" read like mask=disabled.
RENAMED_STRATEGIES = {"none": "control"}


def warn_static_masks(static_masks: bool | None) -> None:
    """``mask.static_masks`` is deprecated and ignored: the forward-pass masks are always installed at setup now."""
    if static_masks is not None:
        warnings.warn(
            f"mask.static_masks={static_masks!r} is ignored and will be removed: masks are always installed "
            "at setup now; drop the setting",
            FutureWarning,
            stacklevel=3,
        )


def current_strategy_name(name: str, warn: bool = True) -> str:
    """``name``, or what a former strategy name is called now (with a ``FutureWarning`` if ``warn``)."""
    if name not in RENAMED_STRATEGIES:
        return name
    current = RENAMED_STRATEGIES[name]
    if warn:
        warnings.warn(
            f"mask strategy {name!r} is now called {current!r} (mask={current}); {name!r} will be removed in the "
            "next release",
            FutureWarning,
            stacklevel=3,
        )
    return current


def make_strategy(name: str) -> MaskStrategy:
    try:
        return STRATEGIES[current_strategy_name(name)]()
    except KeyError:
        raise ConfigError(f"unknown mask strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, tensors: list[Tensor], pruned: Tensor) -> None:
    """Zero the per-element optimizer state (momentum buffer, Adam's exp_avg/exp_avg_sq, ...) of pruned rows.

    Without this, momentum accumulated before pruning keeps moving a kernel whose gradient is zero.
    """
    for tensor in tensors:
        state = optimizer.state.get(tensor)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == tensor.shape:
                value.mul_(_keep_shape(pruned, value.ndim).to(value.device, value.dtype))
