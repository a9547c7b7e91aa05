"""Fast settings by device: what ``auto`` means for precision, memory format and matmul precision.

A run's config says ``trainer.precision: auto``, ``channels_last: auto`` and ``matmul_precision:
auto``; ``resolve_fast_defaults`` turns each into the setting that is fastest on the device the
trainer will use, before the resolved config is written, so ``config.yaml`` records what ran:

============================  ==========================================  ====================
setting                       CUDA GPU                                     CPU
============================  ==========================================  ====================
``trainer.precision``         ``bf16-mixed`` for a large enough training   ``32-true``
                              batch (``SPEED_RULES``), else ``32-true``
``channels_last``             true for a large enough batch, else false    false
``matmul_precision``          ``high`` (TF32 float32 matmuls)              PyTorch's default
============================  ==========================================  ====================

bf16 autocast and channels-last are never free: autocast adds a cast kernel per weight and activation,
and channels-last convolutions of a few channels take slower kernels. A tiny network (MNIST's ConvNet:
1.1 GFLOPs a batch of 128) is launch-bound on a GPU and pays for those launches without gaining from
tensor cores, so ``auto`` decides by the *size of the work*: the forward FLOPs of one training batch
(``training_batch_gflops``), against a threshold per device measured with ``scripts/bench_defaults.py``
(its table is in the README). The CPU thresholds are infinite: fp32 NCHW, which cannot be slower than
itself. On this project's 2-core CPU (AVX-512 BF16) the ladder, measured under heavy load, had bf16
channels-last faster from the MNIST ConvNet up (README); whether that holds on a quiet machine decides
whether the CPU gets finite thresholds too. The CUDA thresholds are provisional until the GPU suite
(``scripts/bench_gpu.py --suite``, which runs the same ladder and suggests thresholds) measures them.
Explicit values win.
The data sets' tensors go to the GPU with the batches (``data.on_device``, see
``pruneflow.data.base``), and ``compile=true`` is a separate switch because compiling costs
tens of seconds up front.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from pruneflow.errors import ConfigError
from pruneflow.module import COMPILE_MODES

log = logging.getLogger(__name__)

AUTO = "auto"
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def trains_on_cuda(trainer_cfg: DictConfig) -> bool:
    """Whether a Trainer built from ``trainer_cfg`` will run on a CUDA device."""
    return str(trainer_cfg.get("accelerator", "auto")) in GPU_ACCELERATORS and torch.cuda.is_available()


@dataclass(frozen=True)
class SpeedRule:
    """From how many forward GFLOPs per training batch bf16 autocast and channels-last pay off on a device."""

    bf16_from_gflops: float
    channels_last_from_gflops: float


SPEED_RULES = {
    # fp32 NCHW whatever the size: never slower than itself (see the module docstring for what the CPU ladder
    # showed under load, and what would change this).
    "cpu": SpeedRule(bf16_from_gflops=math.inf, channels_last_from_gflops=math.inf),
    # Provisional (no GPU measurement yet): the MNIST ConvNet at batch 128 (1.1 GFLOPs) stays fp32 NCHW,
    # a CIFAR VGG11 (39 GFLOPs) or ResNet-56 (32) at batch 128 gets bf16 and channels-last, ResNet-20 (10) not.
    "cuda": SpeedRule(bf16_from_gflops=20.0, channels_last_from_gflops=20.0),
}


def training_batch_gflops(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> float:
    """Forward GFLOPs of ``model`` on one training batch (FLOPs of one image, counted on CPU, × batch size)."""
    from pruneflow.compaction.cost import count_flops

    image = torch.zeros(1, *(int(size) for size in input_shape))
    return count_flops(model, image) * batch_size / 1e9


def pays_off(gflops: float, threshold: float) -> bool:
    """Whether work of ``gflops`` reaches ``threshold`` (an infinite threshold: never, whatever the size)."""
    return math.isfinite(threshold) and gflops >= threshold


def fast_precision(on_cuda: bool, gflops: float = math.inf) -> str:
    rule = SPEED_RULES["cuda" if on_cuda else "cpu"]
    bf16 = on_cuda and torch.cuda.is_bf16_supported() and pays_off(gflops, rule.bf16_from_gflops)
    return "bf16-mixed" if bf16 else "32-true"


def fast_channels_last(on_cuda: bool, gflops: float = math.inf) -> bool:
    return pays_off(gflops, SPEED_RULES["cuda" if on_cuda else "cpu"].channels_last_from_gflops)


def resolve_fast_defaults(cfg: DictConfig, gflops: float = math.inf) -> dict[str, object]:
    """Replace every ``auto`` among the speed settings of ``cfg`` (in place); returns what was chosen.

    ``gflops``: the forward GFLOPs of one training batch of the run's model (``training_batch_gflops``);
    unknown (infinite), ``auto`` picks what pays off for large models."""
    on_cuda = trains_on_cuda(cfg.trainer)
    chosen: dict[str, object] = {}
    with open_dict(cfg):
        if cfg.trainer.get("precision") == AUTO:
            cfg.trainer.precision = chosen["trainer.precision"] = fast_precision(on_cuda, gflops)
        if cfg.get("channels_last", False) == AUTO:
            cfg.channels_last = chosen["channels_last"] = fast_channels_last(on_cuda, gflops)
        if cfg.get("matmul_precision") == AUTO:
            cfg.matmul_precision = chosen["matmul_precision"] = "high" if on_cuda else None
    for key, accepted in (("channels_last", "true, false or auto"), ("compile", "true or false")):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be {accepted}, got {value!r}")
    mode = cfg.get("compile_mode", "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    matmul = cfg.get("matmul_precision")
    if matmul not in (None, "highest", "high", "medium"):
        raise ConfigError(f"matmul_precision must be auto, null, highest, high or medium, got {matmul!r}")
    if chosen:
        size = "" if math.isinf(gflops) else f" and {gflops:.3g} GFLOPs a training batch"
        log.info("fast defaults for %s%s: %s", "this CUDA GPU" if on_cuda else "CPU", size, chosen)
    return chosen
