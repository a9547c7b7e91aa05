"""The trap probe: what a finished run's network does at its pruned channels where a family has a new trap.

A pruned channel is only gone if nothing downstream writes into it again. Beyond a BatchNorm's β after a zeroed
conv (the ConvNet/VGG findings), the findings families (issue 30) each add a place where it can come back:

- **residual** (a coupled stream: ResNet, the inverted residuals, ConvNeXt): the skip path adds the block's input
  to every member's output, so a pruned channel is zero only if every producer of the stream is zero there, β
  included — measured as what the stream's readers receive (the next block's convs, a depthwise conv reading the
  stream: its input is the skip) at pruned against kept channels, and what the members' BatchNorms write there;
- **se** (squeeze-and-excitation): the gate is sigmoid(0) = hard-sigmoid(0) = 0.5 at a channel whose squeezed
  input is zero, so the gated product is zero only if the channel it multiplies is — the gate's value and the
  product at pruned channels;
- **layernorm** (over the channels: ConvNeXt's channels-last LN, a ViT's): its mean and variance count every
  channel it reads, pruned zeros included, and its β writes into a pruned channel again — the input's mean and
  variance over kept and pruned channels, how far the statistics over all channels are from those over the kept
  ones (what an LN that counts the pruned channels gets wrong), and the output at pruned channels;
- **layer_scale** (ConvNeXt): a per-channel parameter multiplied into the stream, its value at pruned channels;
- **heads** (attention pruned by heads): what the attention's output projection reads at pruned head rows.

Everything is found from the channel graph the run was pruned with (``TrainedRun.layers``: spaces, their
producers, norms, points, scales and readers) and module types (a gate is an ``nn.Sigmoid`` / ``nn.Hardsigmoid``
beside a producer of a coupled space), never from a family's module names. Readings are forward hooks registered
after the masks' own, so they see what the next layer receives: a mask applied in the wrong place shows here.

One batch of the test split is run in eval mode and in train mode (BatchNorm's batch statistics: a zeroed channel
leaves it as exactly β), and one backward pass in train mode gives the gradient at the producers' pruned rows.
The result is a flat ``{key: float}``; ``cached_traps`` keeps it as ``<run>/traps.json`` (written atomically), so
a report reruns without rebuilding networks.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pruneflow.atomic_io import write_json_atomic
from pruneflow.compaction import load_trained_run, test_batches
from pruneflow.graph import LAYER_NORMS, ChannelSpace, Consumer, PrunableLayer, is_layer_norm
from pruneflow.graph.layers import kernel_row_mask
from pruneflow.pruning.strategies import make_strategy

log = logging.getLogger(__name__)

TRAPS_FILE = "traps.json"
# Bumped when a key's meaning changes: a cached traps.json of another version is measured again.
TRAPS_VERSION = 1
GATES = (nn.Sigmoid, nn.Hardsigmoid)
MODES = ("eval", "train")
PROBE_IMAGES = 256  # one batch: the readings are means over channels and positions, stable well before this


class Readings:
    """Per key, the mean of the readings taken (each one module's mean over a batch), and per ``…_max`` key
    the largest."""

    def __init__(self) -> None:
        self.taken: dict[str, list[float]] = defaultdict(list)

    def add(self, key: str, value: Tensor | float) -> None:
        self.taken[key].append(float(value))

    def result(self) -> dict[str, float]:
        return {key: max(found) if key.endswith("_max") else sum(found) / len(found)
                for key, found in sorted(self.taken.items())}  # fmt: skip


def _abs_mean(values: Tensor, dim: int, index: Tensor) -> Tensor:
    return values.index_select(dim, index.to(values.device)).abs().mean()


def _abs_max(values: Tensor, dim: int, index: Tensor) -> Tensor:
    return values.index_select(dim, index.to(values.device)).abs().max()


def reader_entries(consumer: Consumer, channels: Tensor) -> tuple[int, Tensor]:
    """(dim, indices) of ``channels`` in the input a consumer receives: a linear layer reads its features at the
    last dim (a block per channel after a flatten), a conv its channels at dim 1 (a grouped conv: at the space's
    offset, which ``Consumer.columns`` folds into its group's block)."""
    if consumer.kind == "linear":
        return -1, consumer.columns(channels)
    if consumer.kind == "grouped" and not consumer.at:
        return 1, channels + consumer.offset
    return 1, consumer.columns(channels)


def trap_kind(space: ChannelSpace, modules: Mapping[str, nn.Module]) -> str:
    """``se`` for a space coupled through a gate's product, ``heads`` for an attention's head rows, ``residual``
    for any other coupled space (members meeting in an addition), else ``plain``."""
    if space.heads > 1 or space.whole_heads:
        return "heads"
    if space.coupled and _gates(space, modules):
        return "se"
    return "residual" if space.coupled else "plain"


def _gates(space: ChannelSpace, modules: Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """(name, module) of each module holding a producer of ``space`` beside a gate activation: a squeeze-and-
    excitation block (torchvision's ``SqueezeExcitation``, timm's ``SqueezeExcite``) whose product couples it."""
    found = {}
    for layer in space.producers:
        parent = layer.name.rpartition(".")[0]
        module = modules.get(parent)
        if module is not None and any(isinstance(child, GATES) for child in module.children()):
            found[parent] = module
    return list(found.items())


class TrapProbe:
    """Forward hooks, while entered, reading the traps of the pruned ``spaces`` (each with its mask) into
    ``readings``, each key ending in the current ``mode`` (``/eval``, ``/train``) where the mode matters."""

    def __init__(self, network: nn.Module, spaces: Sequence[tuple[ChannelSpace, Tensor]]) -> None:
        self.network = network
        self.modules = dict(network.named_modules())
        self.spaces = spaces
        self.readings = Readings()
        self.mode = "eval"
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> TrapProbe:
        for space, pruned in self.spaces:
            kind = trap_kind(space, self.modules)
            lost, kept = pruned.nonzero().flatten(), (~pruned).nonzero().flatten()
            self._readers(space, kind, lost, kept)
            if kind == "residual":
                for layer in space.producers:
                    if isinstance(layer.norm, nn.modules.batchnorm._BatchNorm):
                        self._output(layer.norm, f"{kind}/norm_pruned_abs_mean", 1, lost)
            if kind == "se":
                for _, block in _gates(space, self.modules):
                    self._gate(block, space.width, lost, kept)
            self._layer_norms(space, lost, kept)
            for scale in space.scales:
                value = self.network.get_parameter(scale.name).detach()
                self.readings.add("layer_scale/pruned_abs_mean", _abs_mean(value, scale.dim, scale.channels(lost)))
                self.readings.add("layer_scale/kept_abs_mean", _abs_mean(value, scale.dim, scale.channels(kept)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _key(self, key: str) -> str:
        return f"{key}/{self.mode}"

    def _pre(self, module: nn.Module, read: Callable[[Tensor], None]) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _, inputs: read(inputs[0].detach())))

    def _post(self, module: nn.Module, read: Callable[[Tensor, Tensor], None]) -> None:
        self.handles.append(
            module.register_forward_hook(lambda _, inputs, output: read(inputs[0].detach(), output.detach()))
        )

    def _output(self, module: nn.Module, key: str, dim: int, lost: Tensor) -> None:
        self._post(module, lambda _, out: self.readings.add(self._key(key), _abs_mean(out, dim, lost)))

    def _readers(self, space: ChannelSpace, kind: str, lost: Tensor, kept: Tensor) -> None:
        """What every module reading the space receives at its pruned and kept channels: its consumers, and the
        depthwise producers reading it (a ConvNeXt block's first conv reads the stream its skip adds back)."""
        readers = [(self.modules[c.name], *reader_entries(c, lost), reader_entries(c, kept)[1])
                   for c in space.consumers if c.name in self.modules]  # fmt: skip
        # A depthwise producer after the space's first reads the space (the first writes it from its own input)
        readers += [(layer.producer, 1, lost, kept) for layer in space.producers[1:] if layer.depthwise]
        name = "skip" if kind == "residual" else "read"
        for module, dim, at_lost, at_kept in readers:

            def read(values: Tensor, dim: int = dim, at_lost: Tensor = at_lost, at_kept: Tensor = at_kept) -> None:
                self.readings.add(self._key(f"{kind}/{name}_pruned_abs_mean"), _abs_mean(values, dim, at_lost))
                self.readings.add(self._key(f"{kind}/{name}_kept_abs_mean"), _abs_mean(values, dim, at_kept))
                self.readings.add(self._key("reader/pruned_abs_max"), _abs_max(values, dim, at_lost))

            self._pre(module, read)

    def _gate(self, block: nn.Module, width: int, lost: Tensor, kept: Tensor) -> None:
        gate = next(child for child in block.children() if isinstance(child, GATES))

        def gated(_: Tensor, value: Tensor) -> None:
            if value.dim() < 2 or value.shape[1] != width:
                return  # the gate activation used on another tensor of the block
            self.readings.add(self._key("se/gate_pruned_mean"), value.index_select(1, lost).mean())
            self.readings.add(self._key("se/gate_kept_mean"), value.index_select(1, kept).mean())

        def product(scaled: Tensor, out: Tensor) -> None:
            if out.dim() < 2 or out.shape[1] != width:
                return
            self.readings.add(self._key("se/input_pruned_abs_mean"), _abs_mean(scaled, 1, lost))
            self.readings.add(self._key("se/product_pruned_abs_mean"), _abs_mean(out, 1, lost))
            self.readings.add(self._key("se/product_kept_abs_mean"), _abs_mean(out, 1, kept))

        self._post(gate, gated)
        self._post(block, product)

    def _layer_norms(self, space: ChannelSpace, lost: Tensor, kept: Tensor) -> None:
        """Each LayerNorm over the channels reading the space: a producer's norm (its channels as the space's) or
        a point reading it among others (its entries)."""
        norms: list[tuple[nn.Module, Tensor, Tensor]] = [
            (layer.norm, lost, kept) for layer in space.producers
            if layer.norm is not None and is_layer_norm(layer.norm)
        ]  # fmt: skip
        norms += [(point.module, point.channels(lost), point.channels(kept))
                  for point in space.points if is_layer_norm(point.module)]  # fmt: skip
        for norm, at_lost, at_kept in norms:
            self._post(norm, partial(self._layer_norm, norm, at_lost, at_kept))

    def _layer_norm(self, norm: nn.Module, lost: Tensor, kept: Tensor, inputs: Tensor, out: Tensor) -> None:
        # Channels to the last dim; statistics per position (token), then averaged over positions.
        dim = LAYER_NORMS[type(norm)]
        x, y = inputs.movedim(dim, -1), out.movedim(dim, -1)
        at_lost, at_kept = x.index_select(-1, lost), x.index_select(-1, kept)
        every = x.float()
        kept_var = at_kept.var(-1, unbiased=False)
        shift = (every.mean(-1) - at_kept.mean(-1)).abs() / (kept_var + norm.eps).sqrt()
        add = self.readings.add
        add(self._key("layernorm/input_mean_kept"), at_kept.mean())
        add(self._key("layernorm/input_mean_pruned"), at_lost.mean())
        add(self._key("layernorm/input_var_kept"), kept_var.mean())
        add(self._key("layernorm/input_var_pruned"), at_lost.var(-1, unbiased=False).mean())
        # What an LN counting every channel gets wrong: its mean off the kept channels' (in kept std) and its
        # variance over theirs.
        add(self._key("layernorm/mean_shift"), shift.mean())
        add(self._key("layernorm/var_ratio"), (every.var(-1, unbiased=False) / (kept_var + norm.eps)).mean())
        add(self._key("layernorm/output_pruned_abs_mean"), y.index_select(-1, lost).abs().mean())
        add(self._key("layernorm/output_kept_abs_mean"), y.index_select(-1, kept).abs().mean())
        if getattr(norm, "bias", None) is not None:  # an RMS norm has no β
            add("layernorm/beta_pruned_abs_mean", norm.bias.detach().abs().index_select(0, lost).mean())


def pruned_spaces(layers: Iterable[PrunableLayer], pruned: Mapping[str, Tensor]) -> list[tuple[ChannelSpace, Tensor]]:
    """Each space with pruned channels, with its mask (every producer of a space shares one)."""
    spaces: dict[int, tuple[ChannelSpace, Tensor]] = {}
    for layer in layers:
        mask = pruned.get(layer.name)
        if layer.space is not None and mask is not None and bool(mask.any()) and id(layer.space) not in spaces:
            spaces[id(layer.space)] = (layer.space, mask.cpu().bool())
    return list(spaces.values())


def measure_traps(
    network: nn.Module,
    layers: Sequence[PrunableLayer],
    pruned: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor,
    strategy: str,
) -> dict[str, float]:
    """The trap readings of ``network`` (masks installed as the run trained) on one batch, in eval and train mode,
    and the largest |gradient| at a pruned row of any producer (``guarantee/grad_pruned_abs_max``: 0 is the
    ``activation`` mask's guarantee). A copy's state changes (train mode updates BatchNorm's running statistics):
    pass a network that is thrown away after."""
    spaces = pruned_spaces(layers, pruned)
    result: dict[str, float] = {"traps/version": float(TRAPS_VERSION), "traps/pruned_spaces": float(len(spaces))}
    modules = dict(network.named_modules())
    for space, _ in spaces:
        key = f"{trap_kind(space, modules)}/spaces"
        result[key] = result.get(key, 0.0) + 1
    if not spaces:
        return result
    rows = [(tensor, kernel_row_mask(layer.producer, mask)) for layer in layers
            if (mask := pruned.get(layer.name)) is not None and bool(mask.any())
            for tensor in make_strategy(strategy).trainable_tensors(layer)]  # fmt: skip
    with TrapProbe(network, spaces) as probe:
        for mode in MODES:
            probe.mode = mode
            network.train(mode == "train")
            network.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(mode == "train"):
                logits = network(images)
            if mode == "train":
                F.cross_entropy(logits, labels).backward()
    grads = [tensor.grad[mask.to(tensor.device)].abs().max() for tensor, mask in rows if tensor.grad is not None]
    if grads:
        probe.readings.add("guarantee/grad_pruned_abs_max", torch.stack(grads).max())
    network.eval()
    return {**result, **probe.readings.result()}


def probe_run(run_dir: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None,
              images: int = PROBE_IMAGES) -> dict[str, float]:  # fmt: skip
    """Rebuild a finished run (``config.yaml``, ``checkpoints/last.ckpt`` and the masks it stores: see
    ``compaction.load_trained_run``) and measure its traps on the first ``images`` test images."""
    run = load_trained_run(run_dir, data_root=data_root)
    run.datamodule.setup("test")
    batch_images, batch_labels = next(iter(test_batches(run.datamodule)))
    return measure_traps(run.network, run.layers, run.pruned, batch_images[:images], batch_labels[:images],
                         run.strategy)  # fmt: skip


def cached_traps(run_dir: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """``<run>/traps.json`` where it holds this version's readings of the run's last checkpoint, else
    ``probe_run``'s, written there (a checkpoint newer than the file, of a run trained again, is measured again)."""
    path = Path(run_dir) / TRAPS_FILE
    checkpoint = Path(run_dir) / "checkpoints" / "last.ckpt"
    try:
        cached = json.loads(path.read_text())
        newer = checkpoint.is_file() and checkpoint.stat().st_mtime > path.stat().st_mtime
        if cached.get("traps/version") == TRAPS_VERSION and not newer:
            return cached
    except (OSError, ValueError):
        pass  # absent or unreadable: measure again
    readings = probe_run(run_dir, data_root)
    write_json_atomic(path, readings)
    return readings
