"""Drift telemetry: do pruned kernels stay at zero, and are pruned channels really dead?

Per pruned layer (tags ``<metric>/<layer name>``) and aggregated over layers (tag ``<metric>``):

- ``drift/producer_l2``, ``drift/producer_max_abs``: the pruned channels' producing kernels (and
  bias) as the forward pass uses them; ``drift/stored_l2`` the stored weight where a
  parametrization separates the two; ``drift/zero_fraction``: share of pruned kernels exactly zero;
- ``drift/consumer_l2``: how far the consumers' input slices for pruned channels moved since pruning;
- ``grad/pruned_l2``: the gradient at the pruned kernels' trainable tensors the optimizer step receives,
  before any gradient mask — non-zero whenever anything downstream still sees the channel;
- ``leak/activation_abs_mean``: mean |activation| of pruned channels at their channel point in
  training forwards (a BatchNorm's β shows up here). Eager networks reduce it on logging steps
  only; a compiled graph reduces it in every training forward (fused into the kernels that write
  the activation), because switching it on and off would recompile the graph;
- ``leak/eval_activation_abs_mean``: the same in eval mode, on one fixed validation batch (the first
  of each validation epoch). A dead channel's BatchNorm outputs β in train mode (batch statistics of
  an all-zero channel are 0), but γ·(0 − running mean)/√(running var + ε) + β in eval mode;
- ``bn/beta_abs``, ``bn/gamma_abs``: mean |β|, |γ| of the pruned channels' BatchNorm;
  ``bn/pruned_running_var``: their mean running variance — it decays towards 0 once the channel
  is dead, so eval mode divides whatever still reaches the channel by ≈ √ε —, and
  ``bn/pruned_eval_gain``: mean |γ|/√(running var + ε), that amplifier itself.

What moved the pruned rows (weight and bias rows of the pruned kernels' trainable tensors) over the
measured optimizer step, read from the optimizer's own state and ``param_groups`` after the step:

- ``optim/pruned_grad_l2``: the gradient (the same value as ``grad/pruned_l2``, kept for dashboards
  and reports that read that tag);
- ``optim/pruned_momentum_l2``: SGD's momentum buffer — after the step, the buffer the step used;
- ``optim/pruned_exp_avg_l2``, ``optim/pruned_exp_avg_sq_mean``: Adam's / AdamW's first moment (L2)
  and second moment (mean over the pruned entries);
- ``optim/pruned_decay_l2``: weight decay's pull ``wd · w`` on the rows before the step. Coupled decay
  (SGD, Adam) enters the gradient the optimizer uses; decoupled decay (AdamW) shrinks the stored
  weight by ``lr · wd · w`` directly — either way it acts on stored weights whose gradient is zero;
- ``optim/pruned_update_l2``: the rows' actual change over the optimizer step, from a copy of the
  pruned rows only, taken before the step on measured steps only (a strategy's re-zeroing after the
  step is not part of it: under ``hard`` this is what the optimizer does before being undone).

A metric that does not apply (no momentum, not Adam, no BatchNorm) is left out.

All quantities are reduced on the device into one tensor and fetched with a single host transfer per
logging step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pruneflow.graph import Consumer, PrunableLayer
from pruneflow.graph.layers import input_weight, kernel_row_mask, qkv_tensors
from pruneflow.pruning.strategies import QKV_KEEP_BUFFER, MaskStrategy

# (C,) float buffer on each channel point: 1 where the channel is pruned. A buffer, so it follows the
# module to its device and a compiled graph reads its values without a recompile when pruning rewrites it.
PRUNED_BUFFER = "pruneflow_pruned"
QKV_PRUNED_BUFFER = "pruneflow_pruned_qkv"  # an attention's q, k, v rows (``PrunableLayer.inside_unit``)

# Raw per-layer fields reduced on the device; metrics (and their aggregates) are derived from them.
# The optimizer's share of a layer's pruned rows (sums over the rows; -1: does not apply).
OPTIMIZER_FIELDS = ("momentum_sq", "exp_avg_sq", "exp_avg_sq_sum", "state_entries", "decay_sq", "update_sq")
LAYER_FIELDS = (
    "pruned", "producer_sq", "producer_max_abs", "zero_kernels", "stored_sq", "consumer_sq", "grad_sq",
    "leak_mean", "beta_abs_sum", "gamma_abs_sum", "running_var_sum", "eval_gain_sum",
)  # fmt: skip
FIELDS = (*LAYER_FIELDS, *OPTIMIZER_FIELDS)  # the order of a raw row, built by name from both


# The aggregate tags, in the order the dashboard shows them.
AGGREGATE_TAGS = (
    "drift/producer_l2", "drift/producer_max_abs", "drift/zero_fraction", "drift/stored_l2", "drift/consumer_l2",
    "grad/pruned_l2", "leak/activation_abs_mean", "leak/eval_activation_abs_mean", "bn/beta_abs", "bn/gamma_abs",
    "bn/pruned_running_var", "bn/pruned_eval_gain", "optim/pruned_grad_l2", "optim/pruned_momentum_l2",
    "optim/pruned_exp_avg_l2", "optim/pruned_exp_avg_sq_mean", "optim/pruned_decay_l2", "optim/pruned_update_l2",
)  # fmt: skip
EVAL_LEAK_TAG = "leak/eval_activation_abs_mean"


# Custom Scalars categories: (title, tag prefixes), the question each group of charts answers.
LAYOUT_CATEGORIES = (
    ("pruneflow: do pruned kernels stay at zero?", ("drift/",)),
    ("pruneflow: what moved them (the optimizer's share)", ("optim/", "grad/")),
    ("pruneflow: where the leak comes from (BatchNorm, train vs eval)", ("leak/", "bn/")),
)


def custom_scalars_layout() -> dict[str, dict[str, list]]:
    """TensorBoard "Custom Scalars" layout: one chart per telemetry metric, its aggregate and every
    layer, so runs (strategies) overlay in one picture; charts grouped by the question they answer."""
    return {
        title: {tag: ["Multiline", [f"^{tag}(/.*)?$"]] for tag in AGGREGATE_TAGS if tag.startswith(prefixes)}
        for title, prefixes in LAYOUT_CATEGORIES
    }


class DriftTelemetry:
    """Measures the pruned channels of ``layers`` under ``strategy``; see the module docstring for the metrics."""

    def __init__(self, layers: Sequence[PrunableLayer], strategy: MaskStrategy, modules: dict[str, nn.Module]) -> None:
        self.layers = list(layers)
        self.strategy = strategy
        self.modules = modules
        self.pruned: dict[str, Tensor] = {}
        self.consumer_reference: dict[tuple[str, str], Tensor] = {}
        self._leak: dict[str, Tensor] = {}
        self._eval_leak: dict[str, Tensor] = {}
        self._grad_sq: dict[str, Tensor] = {}
        self._rows_before: dict[str, list[Tensor]] = {}
        self._optimizer_share: dict[str, Tensor] = {}
        self._row_index: dict[str | tuple[str, str], tuple[Tensor, int, Tensor]] = {}
        self._column_index: dict[tuple[str, Consumer], tuple[Tensor, Tensor]] = {}
        self._leak_armed = False
        self._eval_leak_armed = False
        self._handles: list[RemovableHandle] = []
        for layer in self.layers:
            point = layer.channel_point
            buffer = QKV_PRUNED_BUFFER if qkv_rows(layer) else PRUNED_BUFFER
            point.register_buffer(buffer, torch.zeros(layer.num_channels), persistent=False)
            # Every key present from the start (-1: not measured): a compiled graph then only rewrites values.
            self._leak[layer.name] = torch.full((), -1.0)
            self._eval_leak[layer.name] = torch.full((), -1.0)
            if qkv_rows(layer):
                self._handles.append(point.register_forward_hook(self._qkv_leak_hook(layer.name)))
            else:
                self._handles.append(point.register_forward_hook(self._leak_hook(layer.name, layer.channel_shape)))
        # Norms reading a space among other channels (after a concatenation) write β into it again: their
        # leak, over every pruned channel they carry, counts for each layer whose space they read.
        for layer in self.layers:
            for extra in layer.space.points if layer.space is not None else []:
                if extra.name not in self._leak:
                    pruned = torch.zeros(extra.width, device=layer.producer.weight.device)
                    extra.module.register_buffer(PRUNED_BUFFER, pruned, persistent=False)
                    self._leak[extra.name] = torch.full((), -1.0)
                    self._eval_leak[extra.name] = torch.full((), -1.0)
                    self._handles.append(extra.module.register_forward_hook(self._leak_hook(extra.name, extra.shape)))

    def rows(self, name: str, pruned: Tensor, device: torch.device, producer: nn.Module | None = None) -> Tensor:
        """Indices of ``pruned``'s channels on ``device`` (with a ``producer``: of the rows of its trainable tensors
        that write them, ``kernel_row_mask``), found once per mask version: ``t[mask]`` and ``mask.nonzero()`` read
        the mask back to the host (a GPU sync) on every measured step, while ``index_select`` with indices kept on
        the device does not."""
        key = name if producer is None else (name, "kernels")
        cached = self._row_index.get(key)
        if cached is None or cached[0] is not pruned or cached[1] != pruned._version or cached[2].device != device:
            rows = pruned if producer is None else kernel_row_mask(producer, pruned)
            cached = (pruned, pruned._version, rows.to(device).nonzero().flatten())
            self._row_index[key] = cached
        return cached[2]

    def columns(self, name: str, consumer: Consumer, index: Tensor) -> Tensor:
        """``consumer.columns(index)``, found once per mask version (``index`` is ``rows``' cached tensor): a
        consumer reading a reordered space (``Consumer.at``) keeps the columns of the channels it reads, a
        selection whose size only the host can know."""
        cached = self._column_index.get((name, consumer))
        if cached is None or cached[0] is not index:
            cached = (index, consumer.columns(index))
            self._column_index[(name, consumer)] = cached
        return cached[1]

    # -- events -----------------------------------------------------------------------------------
    @torch.no_grad()
    def on_pruned(self, layer: PrunableLayer, pruned: Tensor) -> None:
        """Record the layer's mask and snapshot the consumer slices of channels pruned just now."""
        newly = pruned & ~self.pruned.get(layer.name, torch.zeros_like(pruned))
        self.set_mask(layer, pruned)
        for consumer in layer.consumers:
            weight = self.consumer_weight(consumer)
            key = (layer.name, consumer.name)
            reference = self.consumer_reference.setdefault(key, weight.detach().clone())
            columns = consumer.columns(newly.nonzero().flatten().to(weight.device))
            reference[:, columns] = weight.detach()[:, columns]

    @torch.no_grad()
    def set_mask(self, layer: PrunableLayer, pruned: Tensor) -> None:
        """The layer's pruned channels, for measuring (also when a resumed run restores them)."""
        self.pruned[layer.name] = pruned.clone()
        getattr(layer.channel_point, QKV_PRUNED_BUFFER if qkv_rows(layer) else PRUNED_BUFFER).copy_(pruned)
        for extra in layer.space.points if layer.space is not None else []:
            channels, entries = extra.placed(len(pruned))
            buffer = getattr(extra.module, PRUNED_BUFFER)
            buffer[entries.to(buffer.device)] = pruned[channels.to(pruned.device)].to(buffer)

    def arm(self, armed: bool) -> None:
        """Measure leaks in the coming training forward (only on logging steps: it costs a reduction)."""
        self._leak_armed = armed

    def arm_eval(self, armed: bool) -> None:
        """Measure leaks in the coming eval-mode forward (the fixed validation batch)."""
        self._eval_leak_armed = armed

    @property
    def eval_leak_armed(self) -> bool:
        return self._eval_leak_armed

    @torch.no_grad()
    def snapshot_rows(self) -> None:
        """Copy the pruned rows (only those) of each masked layer's trainable tensors; call before the step."""
        for layer in self.layers:
            pruned = self.pruned.get(layer.name)
            if pruned is not None:
                self._rows_before[layer.name] = [
                    t.detach().index_select(0, self.rows(layer.name, pruned, t.device, layer.producer))
                    for t in self.strategy.trainable_tensors(layer)
                ]

    @torch.no_grad()
    def record_optimizer_step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """The optimizer's share of the step just taken (see the module docstring), from its state and
        ``param_groups``; call after the step, before any re-zeroing or state reset."""
        groups = {id(p): (optimizer, group) for optimizer in optimizers for group in optimizer.param_groups
                  for p in group["params"]}  # fmt: skip
        for layer in self.layers:
            pruned = self.pruned.get(layer.name)
            before = self._rows_before.pop(layer.name, None)
            if pruned is None or before is None:
                continue
            tensors = self.strategy.trainable_tensors(layer)
            fields = dict.fromkeys(OPTIMIZER_FIELDS, None)
            for tensor, rows_before in zip(tensors, before, strict=True):
                index = self.rows(layer.name, pruned, tensor.device, layer.producer)
                optimizer, group = groups.get(id(tensor), (None, {}))
                state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
                parts = {
                    "update_sq": (tensor.detach().index_select(0, index) - rows_before).float().pow(2).sum(),
                    "decay_sq": (float(group.get("weight_decay") or 0.0) * rows_before.float()).pow(2).sum(),
                }
                if isinstance(state.get("momentum_buffer"), Tensor):
                    parts["momentum_sq"] = state["momentum_buffer"].index_select(0, index).float().pow(2).sum()
                if isinstance(state.get("exp_avg"), Tensor):
                    parts["exp_avg_sq"] = state["exp_avg"].index_select(0, index).float().pow(2).sum()
                if isinstance(state.get("exp_avg_sq"), Tensor):
                    second = state["exp_avg_sq"].index_select(0, index).float()
                    parts["exp_avg_sq_sum"] = second.sum()
                    parts["state_entries"] = torch.tensor(float(second.numel()), device=second.device)
                for field, value in parts.items():
                    fields[field] = value if fields[field] is None else fields[field] + value
            device = layer.producer.weight.device
            self._optimizer_share[layer.name] = torch.stack(
                [torch.full((), -1.0, device=device) if fields[f] is None else fields[f].to(device)
                 for f in OPTIMIZER_FIELDS]
            )  # fmt: skip

    @torch.no_grad()
    def record_gradients(self) -> None:
        """Gradient at the pruned kernels; call once per optimizer step (accumulation complete), before any
        gradient mask."""
        for layer in self.layers:
            pruned = self.pruned.get(layer.name)
            if pruned is None:
                continue
            grads = [t.grad.index_select(0, self.rows(layer.name, pruned, t.grad.device, layer.producer))
                     for t in self.strategy.trainable_tensors(layer) if t.grad is not None]  # fmt: skip
            if grads:
                self._grad_sq[layer.name] = sum(g.float().pow(2).sum() for g in grads)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            points = [layer.channel_point, *(extra.module for extra in (layer.space.points if layer.space else []))]
            for point in points:
                for buffer in (PRUNED_BUFFER, QKV_PRUNED_BUFFER):
                    if hasattr(point, buffer):
                        delattr(point, buffer)

    # -- measurement ------------------------------------------------------------------------------
    @staticmethod
    def _layer_leak(leaks: dict[str, Tensor], layer: PrunableLayer, device: torch.device) -> Tensor:
        """The largest measured leak at the layer's channel point and the norms reading its space (-1: none)."""
        names = [layer.name, *(extra.name for extra in (layer.space.points if layer.space is not None else []))]
        measured = [leaks[name].float().to(device) for name in dict.fromkeys(names) if name in leaks]
        return torch.stack(measured).amax() if measured else torch.full((), -1.0, device=device)

    def consumer_weight(self, consumer: Consumer) -> Tensor:
        return input_weight(self.modules[consumer.name])

    def _leak_hook(self, name: str, shape: tuple[int, ...]):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor | tuple[Tensor, ...]) -> None:
            output = output[0] if isinstance(output, tuple) else output  # ``nn.MultiheadAttention``'s (output, weights)
            if len(shape) == 1 and output.shape[-1] != shape[0]:  # channels last, side by side (an LSTM's directions)
                output = output.unflatten(-1, (-1, shape[0]))
            # `is_compiling()` first: a compiled graph never reads the Python flag, so it never recompiles.
            if module.training:
                if torch.compiler.is_compiling() or self._leak_armed:
                    self._leak[name] = pruned_channel_abs_mean(output.detach(), getattr(module, PRUNED_BUFFER), shape)
            elif torch.compiler.is_compiling() or self._eval_leak_armed:
                self._eval_leak[name] = pruned_channel_abs_mean(output.detach(), getattr(module, PRUNED_BUFFER), shape)

        return hook

    def _qkv_leak_hook(self, name: str):
        """At a Swin, BEiT or EVA attention: the mean |q, k, v| of the pruned rows as the forward computed them
        (``qkv`` on the attention's input with its bias, BEiT's and EVA's ``q_bias``, ``k_bias``, ``v_bias``, its rows
        times the ``activation`` keep-vector where there is one), on measured steps."""

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            armed = self._leak_armed if module.training else self._eval_leak_armed
            if not (torch.compiler.is_compiling() or armed):
                return
            with torch.no_grad():
                keep = getattr(module, QKV_KEEP_BUFFER, None)
                weight, bias = qkv_tensors(module)
                if keep is not None:
                    weight = weight * keep.to(weight.dtype).view(-1, 1)
                    bias = None if bias is None else bias * keep.to(bias.dtype)
                rows = torch.nn.functional.linear(inputs[0].detach(), weight, bias)
                leak = pruned_channel_abs_mean(rows, getattr(module, QKV_PRUNED_BUFFER), (-1,))
            (self._leak if module.training else self._eval_leak)[name] = leak

        return hook

    @torch.no_grad()
    def _raw(self, layer: PrunableLayer, pruned: Tensor, transient_only: bool) -> Tensor:
        weight = layer.producer.weight.detach()
        device = weight.device
        index = self.rows(layer.name, pruned, device)  # before .to(device): the cache knows the mask itself
        pruned = pruned.to(device)
        zero = torch.zeros((), device=device)
        rows = [weight.index_select(0, index).flatten(1).float()]
        if layer.producer.bias is not None:
            rows.append(layer.producer.bias.detach().index_select(0, index).float().view(-1, 1))
        kernels = torch.cat(rows, dim=1)
        stored = self.strategy.stored_weight(layer)
        consumer_sq = zero - 1 if transient_only else zero.clone()
        columns_of = index
        for consumer in [] if transient_only else layer.consumers:
            weight_now = self.consumer_weight(consumer).detach()
            columns = self.columns(layer.name, consumer, columns_of)
            reference = self.consumer_reference[(layer.name, consumer.name)]
            consumer_sq = consumer_sq + (weight_now[:, columns] - reference[:, columns]).float().pow(2).sum()
        norm = None if transient_only else layer.norm
        # a LayerNorm over channels has no running statistics, and may have no β
        has_affine = norm is not None and norm.weight is not None and getattr(norm, "bias", None) is not None
        running_var = getattr(norm, "running_var", None)
        optimizer_share = self._optimizer_share.pop(layer.name, None)
        if optimizer_share is None:
            optimizer_share = torch.full((len(OPTIMIZER_FIELDS),), -1.0, device=device)
        missing = zero - 1

        def pruned_rows(tensor: Tensor) -> Tensor:  # index_select, not [pruned]: no read back to the host
            return tensor.detach().index_select(0, index).float()

        values = {
            "pruned": pruned.sum().float(),
            "producer_sq": kernels.pow(2).sum(),
            "producer_max_abs": kernels.abs().amax() if kernels.numel() else zero,
            "zero_kernels": (kernels.abs().amax(1) == 0).sum().float(),
            "stored_sq": pruned_rows(stored).pow(2).sum() if stored is not None else missing,
            "consumer_sq": consumer_sq,
            "grad_sq": self._grad_sq.get(layer.name, missing),
            "leak_mean": missing if transient_only else self._layer_leak(self._leak, layer, device),
            "beta_abs_sum": pruned_rows(norm.bias).abs().sum() if has_affine else missing,
            "gamma_abs_sum": pruned_rows(norm.weight).abs().sum() if has_affine else missing,
            "running_var_sum": pruned_rows(running_var).sum() if running_var is not None else missing,
            "eval_gain_sum": _eval_gain(norm, index).sum() if running_var is not None and has_affine else missing,
        }
        assert values.keys() == set(LAYER_FIELDS), sorted(values.keys() ^ set(LAYER_FIELDS))
        row = torch.stack([values[field].to(device) for field in LAYER_FIELDS])
        return torch.cat([row, optimizer_share.to(device)])  # stacked in OPTIMIZER_FIELDS order, by name

    def measure(self, transient_only: bool = False) -> dict[str, float]:
        """All metrics of all pruned layers and their aggregates, with one device→host transfer.

        A metric that does not apply (no BatchNorm, no stored weight, no gradient yet) is left out.
        ``transient_only`` (burst steps between logging steps): the pruned kernels and the optimizer's
        share only — consumer drift, leak and BatchNorm, which move slowly, stay on the interval.
        """
        # Only layers with pruned channels are recorded (decided on the host at each pruning event).
        measured = [layer for layer in self.layers if layer.name in self.pruned]
        if not measured:
            return {}
        device = measured[0].producer.weight.device
        table = torch.stack(
            [self._raw(layer, self.pruned[layer.name], transient_only).to(device) for layer in measured]
        ).cpu()
        rows = [dict(zip(FIELDS, row, strict=True)) for row in table.tolist()]
        metrics: dict[str, float] = {}
        for layer, row in zip(measured, rows, strict=True):
            for tag, value in _derive([row]).items():
                metrics[f"{tag}/{layer.name}"] = value
        metrics.update(_derive(rows))
        return metrics

    def measure_eval_leak(self) -> dict[str, float]:
        """``leak/eval_activation_abs_mean`` (per pruned layer and over them) from the last armed eval forward."""
        measured = [layer for layer in self.layers if layer.name in self.pruned]
        if not measured:
            return {}
        cpu = torch.device("cpu")
        values = torch.stack([self._layer_leak(self._eval_leak, layer, cpu) for layer in measured]).tolist()
        counts = [float(self.pruned[layer.name].sum()) for layer in measured]
        present = [(layer, value, count) for layer, value, count in zip(measured, values, counts, strict=True)
                   if value >= 0]  # fmt: skip
        if not present:
            return {}
        metrics = {f"{EVAL_LEAK_TAG}/{layer.name}": value for layer, value, _ in present}
        metrics[EVAL_LEAK_TAG] = sum(v * c for _, v, c in present) / sum(c for _, _, c in present)
        return metrics


def _eval_gain(norm: nn.BatchNorm2d, index: Tensor) -> Tensor:
    """|γ| / √(running var + ε) of the pruned channels (``index``): how eval mode scales what reaches them."""
    gamma, running_var = norm.weight.detach().index_select(0, index), norm.running_var.index_select(0, index)
    return gamma.float().abs() / (running_var.float() + norm.eps).sqrt()


def qkv_rows(layer: PrunableLayer) -> bool:
    """Whether the layer's channels are an attention's q/k/v rows, measured as its ``qkv`` computes them; an LSTM's
    units, also masked inside their unit, are measured in its output, as any layer's channels."""
    return layer.inside_unit and not layer.rows_inside_unit


def pruned_channel_abs_mean(output: Tensor, pruned: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """Mean |output| over the batch, positions and the channels where ``pruned`` (a (C,) 0/1 float) is 1.

    ``shape``: how the channels broadcast over ``output`` (``PrunableLayer.channel_shape``); default dim 1.

    A weighted sum rather than ``output[:, pruned]``: shapes stay static, so a compiled graph fuses it.
    0 where nothing is pruned.
    """
    shape = shape if shape is not None else (1, -1, *([1] * (output.ndim - 2)))
    weights = pruned.to(output.device, torch.float32).view(shape)
    positions = output.numel() // pruned.numel()
    total = (output.float().abs() * weights).sum()
    return total / (pruned.sum().float() * positions).clamp_min(1.0)


def _derive(rows: list[dict[str, float]]) -> dict[str, float]:
    """Metrics from raw fields, aggregated over ``rows`` (norms add in quadrature, means weight by channels)."""
    pruned = sum(r["pruned"] for r in rows)
    metrics = {
        "drift/producer_l2": math.sqrt(sum(r["producer_sq"] for r in rows)),
        "drift/producer_max_abs": max(r["producer_max_abs"] for r in rows),
        "drift/zero_fraction": sum(r["zero_kernels"] for r in rows) / pruned,
    }
    optional = {
        "drift/consumer_l2": ("consumer_sq", lambda rs: math.sqrt(sum(r["consumer_sq"] for r in rs))),
        "drift/stored_l2": ("stored_sq", lambda rs: math.sqrt(sum(r["stored_sq"] for r in rs))),
        "grad/pruned_l2": ("grad_sq", lambda rs: math.sqrt(sum(r["grad_sq"] for r in rs))),
        "leak/activation_abs_mean": ("leak_mean", lambda rs: _channel_mean(rs, "leak_mean", per_channel=False)),
        "bn/beta_abs": ("beta_abs_sum", lambda rs: _channel_mean(rs, "beta_abs_sum", per_channel=True)),
        "bn/gamma_abs": ("gamma_abs_sum", lambda rs: _channel_mean(rs, "gamma_abs_sum", per_channel=True)),
        "bn/pruned_running_var": ("running_var_sum", lambda rs: _channel_mean(rs, "running_var_sum", per_channel=True)),
        "bn/pruned_eval_gain": ("eval_gain_sum", lambda rs: _channel_mean(rs, "eval_gain_sum", per_channel=True)),
        "optim/pruned_grad_l2": ("grad_sq", lambda rs: math.sqrt(sum(r["grad_sq"] for r in rs))),
        "optim/pruned_momentum_l2": ("momentum_sq", lambda rs: math.sqrt(sum(r["momentum_sq"] for r in rs))),
        "optim/pruned_exp_avg_l2": ("exp_avg_sq", lambda rs: math.sqrt(sum(r["exp_avg_sq"] for r in rs))),
        "optim/pruned_exp_avg_sq_mean": (
            "exp_avg_sq_sum",
            lambda rs: sum(r["exp_avg_sq_sum"] for r in rs) / sum(r["state_entries"] for r in rs),
        ),
        "optim/pruned_decay_l2": ("decay_sq", lambda rs: math.sqrt(sum(r["decay_sq"] for r in rs))),
        "optim/pruned_update_l2": ("update_sq", lambda rs: math.sqrt(sum(r["update_sq"] for r in rs))),
    }
    for tag, (field, reduce) in optional.items():
        present = [r for r in rows if r[field] >= 0]
        if present:
            metrics[tag] = reduce(present)
    return metrics


def _channel_mean(rows: list[dict[str, float]], field: str, per_channel: bool) -> float:
    """Mean over pruned channels; ``per_channel`` fields hold sums over channels, others per-layer means."""
    channels = sum(r["pruned"] for r in rows)
    if per_channel:
        return sum(r[field] for r in rows) / channels
    return sum(r[field] * r["pruned"] for r in rows) / channels
