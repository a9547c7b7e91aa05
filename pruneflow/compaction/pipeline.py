"""Compaction end to end: cut, verify against the masked model, measure cost, export — for a network in
memory (``compact_and_verify``) or at the end of a training run (``compact_trained_module``).

Every ``compact/*`` figure lands in one flat dict, which ``pruneflow.experiment.run`` merges into ``metrics.json``
and logs to TensorBoard:

- verification: ``max_abs_diff``, ``max_rel_diff`` (over the largest |logit|), ``agreement``, ``acc``
  (compacted), ``acc_masked``, ``acc_gap`` (masked − compacted), ``test_images``;
- size: ``channels_before``/``after`` (all prunable convs' channels), ``params_before``/``after``/
  ``ratio``, ``flops_before``/``after``/``ratio`` (per image; ratio = before / after);
- speed: ``latency_<device>_b<B>_before_ms``/``after_ms``/``speedup`` for each batch size B on the device
  the run trained on (``cpu``, ``cuda``: CUDA events, the run's precision and memory format; on CPU
  channels-last, see ``cost``), with ``latency_device``, ``latency_precision``, ``latency_threads`` and
  ``latency_memory_format``; on CPU also under the earlier names ``latency_b<B>_*``. "Before" is the dense
  network with the masks' hooks removed, i.e. what one would deploy without compaction.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from pruneflow.compaction.cost import count_flops, count_parameters, device_latency_ms
from pruneflow.compaction.cut import Compaction, MaskLike, compact, effective_copy
from pruneflow.compaction.export import export_compact
from pruneflow.compaction.verify import device_of, verify
from pruneflow.errors import ConfigError
from pruneflow.pruning.callback import ChannelPruning

log = logging.getLogger(__name__)

LATENCY_BATCH_SIZES = (1, 256)
LATENCY_THREADS = 1  # see cost.cpu_latency_ms: reproducible on a shared machine
LATENCY_MEMORY_FORMAT = "channels_last"  # see cost: the faster CPU layout, for both models


def compact_and_verify(
    network: nn.Module,
    pruned: Mapping[str, MaskLike],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    export_dir: str | os.PathLike[str] | None = None,
    model_config: Mapping[str, Any] | None = None,
    latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    latency_rounds: int = 7,
    latency_threads: int | None = LATENCY_THREADS,
    latency_memory_format: str = LATENCY_MEMORY_FORMAT,
    latency_device: torch.device | str = "cpu",
    latency_precision: str = "32-true",
) -> tuple[Compaction, dict[str, Any]]:
    """Compact ``network`` (left untouched, masks still in effect) and report ``compact/*`` figures.

    ``batches`` are normalised ``(images, labels)`` test batches; ``export_dir`` receives the
    exported model (``model_config``: the original model's ``_target_`` and arguments, to rebuild it).
    """
    compaction = compact(network, pruned)
    checked = verify(network, compaction.model, batches)
    metrics = checked.metrics()
    before, after = compaction.channels
    metrics.update({"compact/channels_before": before, "compact/channels_after": after})
    dense = effective_copy(network)
    metrics.update(
        cost_metrics(
            dense,
            compaction.model,
            checked.input_shape,
            latency_batch_sizes=latency_batch_sizes,
            latency_rounds=latency_rounds,
            latency_threads=latency_threads,
            latency_memory_format=latency_memory_format,
            latency_device=latency_device,
            latency_precision=latency_precision,
        )
    )
    if checked.rounding_amplified:
        log.warning(
            "the compacted model computes the masked one (max |Δ logit| %.2g of the largest |logit| in float64), "
            "but in its own precision the network amplifies float rounding to %.2g of the largest |logit| "
            "(top-1 agreement %.2f %%): an untrained or unstable network, not a wrong cut",
            checked.max_rel_diff, checked.working_precision_rel_diff, 100 * checked.working_precision_agreement,
        )  # fmt: skip
    if not checked.exact:
        log.warning(
            "the compacted model differs from the masked one: max |Δ logit| %.3g (%.2g of the largest |logit|), "
            "top-1 agreement %.2f %%, accuracy %.2f %% → %.2f %%; the cut channels were not dead (expected for "
            "mask=weight or control, and where β leaks)",
            checked.max_abs_diff, checked.max_rel_diff, 100 * checked.agreement, 100 * checked.acc_masked,
            100 * checked.acc,
        )  # fmt: skip
    if export_dir is not None:
        export_compact(compaction, checked.input_shape, export_dir, model_config)
    log.info("compaction: %s", {key: _rounded(value) for key, value in metrics.items()})
    return compaction, metrics


def cost_metrics(
    dense: nn.Module,
    compacted: nn.Module,
    input_shape: Sequence[int],
    latency_batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    latency_rounds: int = 7,
    latency_threads: int | None = LATENCY_THREADS,
    latency_memory_format: str = LATENCY_MEMORY_FORMAT,
    latency_device: torch.device | str = "cpu",
    latency_precision: str = "32-true",
) -> dict[str, Any]:
    """Parameters, FLOPs per image and latency on ``latency_device`` of ``dense`` and ``compacted``, and their
    ratios."""
    models = {"before": dense, "after": compacted}
    image = torch.randn(1, *input_shape, device=device_of(dense))
    metrics: dict[str, Any] = {}
    params = {name: count_parameters(model) for name, model in models.items()}
    flops = {name: count_flops(model, image.to(device_of(model))) for name, model in models.items()}
    for figure, values in (("params", params), ("flops", flops)):
        metrics[f"compact/{figure}_before"] = values["before"]
        metrics[f"compact/{figure}_after"] = values["after"]
        metrics[f"compact/{figure}_ratio"] = values["before"] / max(values["after"], 1)
    device = torch.device(latency_device).type
    for batch_size in latency_batch_sizes:
        batch = torch.randn(batch_size, *input_shape)
        latency = device_latency_ms(models, batch, latency_device, precision=latency_precision,
                                    memory_format=latency_memory_format, rounds=latency_rounds,
                                    threads=latency_threads)  # fmt: skip
        figures = {"before_ms": latency["before"], "after_ms": latency["after"],
                   "speedup": latency["before"] / latency["after"]}  # fmt: skip
        for figure, value in figures.items():
            metrics[f"compact/latency_{device}_b{batch_size}_{figure}"] = value
            if device == "cpu":
                metrics[f"compact/latency_b{batch_size}_{figure}"] = value
    if latency_batch_sizes:
        metrics["compact/latency_device"] = device
        metrics["compact/latency_precision"] = latency_precision
        metrics["compact/latency_threads"] = latency_threads or torch.get_num_threads()
        metrics["compact/latency_memory_format"] = latency_memory_format
    return metrics


def test_batches(
    datamodule: L.LightningDataModule, device: torch.device | str = "cpu"
) -> Iterator[tuple[Tensor, Tensor]]:
    """The datamodule's test batches on ``device``, prepared as in ``trainer.test`` (its
    ``on_after_batch_transfer``: pruneflow's data modules normalise there)."""
    for images, labels in datamodule.test_dataloader():
        yield datamodule.on_after_batch_transfer((images.to(device), labels.to(device)), 0)


def model_config(model_cfg: Mapping[str, Any] | DictConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The ``model`` config group completed with what the run passed from the data: a rebuildable config."""
    config = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    return {**config, "input_shape": list(datamodule.input_shape), "num_classes": int(datamodule.num_classes)}


def run_latency_settings(trainer: L.Trainer, pl_module: L.LightningModule, device: torch.device) -> dict[str, Any]:
    """Latency where and how the run ran: its device and precision, and on CUDA its memory format (on CPU
    channels-last, the faster inference layout there: see ``cost``)."""
    settings: dict[str, Any] = {"latency_device": device, "latency_precision": str(trainer.precision)}
    if device.type == "cuda":
        settings["latency_memory_format"] = "channels_last" if getattr(pl_module, "channels_last", False) \
            else "contiguous"  # fmt: skip
    return settings


def pruning_callback(trainer: L.Trainer) -> ChannelPruning:
    callbacks = [callback for callback in trainer.callbacks if isinstance(callback, ChannelPruning)]
    if len(callbacks) != 1:
        raise ConfigError(f"compaction needs exactly one ChannelPruning callback, the trainer has {len(callbacks)}")
    return callbacks[0]


def compact_trained_module(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    datamodule: L.LightningDataModule,
    export_dir: str | os.PathLike[str],
    model_cfg: Mapping[str, Any] | DictConfig,
) -> dict[str, Any]:
    """After ``trainer.test``: compact the pruned network, verify it on the test set, export it into
    ``export_dir`` and log the ``compact/*`` figures to the trainer's loggers; returns them."""
    callback = pruning_callback(trainer)
    network = callback.network(pl_module)
    if not any(bool(mask.any()) for mask in callback.pruned.values()):
        log.warning("compact=true but nothing was pruned (mask schedule never fired?): the compacted model is dense")
    _, metrics = compact_and_verify(
        network,
        {} if callback.cut else callback.pruned,  # cut inside training already: nothing left to cut
        test_batches(datamodule, device_of(network)),
        export_dir=Path(export_dir),
        model_config=model_config(model_cfg, datamodule),
        **run_latency_settings(trainer, pl_module, device_of(network)),
    )
    metrics.update(callback.budget.check_cut(metrics))  # mask.target: the measured ratio against it
    _log_scalars(trainer, metrics)
    return metrics


@rank_zero_only
def _log_scalars(trainer: L.Trainer, metrics: Mapping[str, Any]) -> None:
    scalars = {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)


def _rounded(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value
