"""Fast settings by device: what ``auto`` means for precision, memory format and matmul precision.

A run's config says ``trainer.precision: auto``, ``channels_last: auto`` and ``matmul_precision:
auto``; ``resolve_fast_defaults`` turns each into the setting that is fastest on the device the
trainer will use, before the resolved config is written, so ``config.yaml`` records what ran:

======================  ====================================  =======================================
setting                 CUDA GPU                              CPU
======================  ====================================  =======================================
``trainer.precision``   ``bf16-mixed`` for a large enough     ``32-true``
                        training batch (``SPEED_RULES``),
                        else ``32-true``
``channels_last``       true for a large enough batch         true for a large enough batch on an x86
                                                              CPU with AVX-512, else false
``matmul_precision``    ``high`` (TF32 float32 matmuls)       PyTorch's default
======================  ====================================  =======================================

bf16 autocast and channels-last are never free: autocast adds a cast kernel per weight and activation,
and channels-last convolutions of a few channels take slower kernels. A tiny network (MNIST's ConvNet:
1.1 GFLOPs a batch of 128) is launch-bound on a GPU and pays for those launches without gaining from
tensor cores, so ``auto`` decides by the *size of the work*: the forward FLOPs of one training batch
(``training_batch_gflops``), against a threshold per device measured with ``python -m benchmarks defaults``
(its table is in the README). On this project's 2-core CPU (AVX-512, with bf16 instructions) the ladder,
measured on a quiet machine, has fp32 channels-last 1.26-1.54x faster than fp32 NCHW from the MNIST ConvNet
(1.1 GFLOPs a batch) up and 0.80x on a toy network (0.002): x86 CPUs with AVX-512 get channels-last from
1 GFLOP (``SPEED_RULES["cpu-avx512"]``); other CPUs were not measured and keep NCHW, which cannot be slower
than itself. bf16 autocast was faster still there (2.0-2.4x with channels-last) but stays opt-in on a CPU:
the masked and the cut network round differently in bf16 (a conv's sum over fewer channels rounds to other
bf16 values), so a cut while training no longer trains on as the masked run to float32 precision, which
pruneflow's CPU runs — its tests, and the exactness checks users reproduce — rely on. The CUDA thresholds are
provisional until the GPU suite (``python -m benchmarks gpu --suite``, which runs the same ladder and suggests
thresholds) measures them.
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
    # A CPU other than x86 with AVX-512 (not measured): fp32 NCHW whatever the size, never slower than itself.
    "cpu": SpeedRule(bf16_from_gflops=math.inf, channels_last_from_gflops=math.inf),
    # x86 with AVX-512, measured (``python -m benchmarks defaults --device cpu``, quiet machine, 2 threads): fp32
    # channels-last 1.54x fp32 NCHW for MNIST's ConvNet at batch 128 (1.09 GFLOPs), 1.26x and 1.29x for CIFAR's
    # small VGG and ResNet-20 (8.7, 10.4), 0.80x for a toy ConvNet (0.002). bf16 never by `auto` on a CPU (module
    # docstring).
    "cpu-avx512": SpeedRule(bf16_from_gflops=math.inf, channels_last_from_gflops=1.0),
    # Provisional (no GPU measurement yet): the MNIST ConvNet at batch 128 (1.1 GFLOPs) stays fp32 NCHW,
    # a CIFAR VGG11 (39 GFLOPs) or ResNet-56 (32) at batch 128 gets bf16 and channels-last, ResNet-20 (10) not.
    "cuda": SpeedRule(bf16_from_gflops=20.0, channels_last_from_gflops=20.0),
}


def cpu_has_avx512() -> bool:
    """Whether PyTorch's CPU kernels run with AVX-512 here (``torch.backends.cpu.get_cpu_capability``)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def speed_rule(on_cuda: bool) -> SpeedRule:
    """The thresholds for the device a run trains on."""
    if on_cuda:
        return SPEED_RULES["cuda"]
    return SPEED_RULES["cpu-avx512" if cpu_has_avx512() else "cpu"]


def training_batch_gflops(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> float:
    """Forward GFLOPs of ``model`` on one training batch (FLOPs of one image, counted on CPU, × batch size)."""
    from pruneflow.compaction.cost import count_flops

    image = torch.zeros(1, *(int(size) for size in input_shape))
    return count_flops(model, image) * batch_size / 1e9


def pays_off(gflops: float, threshold: float) -> bool:
    """Whether work of ``gflops`` reaches ``threshold`` (an infinite threshold: never, whatever the size)."""
    return math.isfinite(threshold) and gflops >= threshold


def fast_precision(on_cuda: bool, gflops: float = math.inf) -> str:
    bf16 = on_cuda and torch.cuda.is_bf16_supported() and pays_off(gflops, speed_rule(on_cuda).bf16_from_gflops)
    return "bf16-mixed" if bf16 else "32-true"


def fast_channels_last(on_cuda: bool, gflops: float = math.inf) -> bool:
    return pays_off(gflops, speed_rule(on_cuda).channels_last_from_gflops)


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
        device = "this CUDA GPU" if on_cuda else f"this CPU ({'' if cpu_has_avx512() else 'no '}AVX-512)"
        log.info("fast defaults for %s%s: %s", device, size, chosen)
    return chosen
