"""Fast settings by device: what ``auto`` means for precision, memory format and matmul precision.

A run's config says ``trainer.precision: auto``, ``channels_last: auto`` and ``matmul_precision:
auto``; ``resolve_fast_defaults`` turns each into the setting that is fastest on the device the
trainer will use, before the resolved config is written, so ``config.yaml`` records what ran:

============================  =================================  ====================
setting                       CUDA GPU                            CPU
============================  =================================  ====================
``trainer.precision``         ``bf16-mixed`` (where supported)    ``32-true``
``channels_last``             true (tensor-core convolutions)     false
``matmul_precision``          ``high`` (TF32 float32 matmuls)     PyTorch's default
============================  =================================  ====================

On CPU, bf16 autocast and channels-last convolutions are slower than float32 NCHW on the cores
without bf16 matrix units this project runs on; they stay available by naming them explicitly.
The data sets' tensors go to the GPU with the batches (``data.on_device``, see
``pruneflow.data.base``), and ``compile=true`` is a separate switch because compiling costs
tens of seconds up front.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, open_dict

from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def trains_on_cuda(trainer_cfg: DictConfig) -> bool:
    """Whether a Trainer built from ``trainer_cfg`` will run on a CUDA device."""
    return str(trainer_cfg.get("accelerator", "auto")) in GPU_ACCELERATORS and torch.cuda.is_available()


def fast_precision(on_cuda: bool) -> str:
    return "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"


def resolve_fast_defaults(cfg: DictConfig) -> dict[str, object]:
    """Replace every ``auto`` among the speed settings of ``cfg`` (in place); returns what was chosen."""
    on_cuda = trains_on_cuda(cfg.trainer)
    chosen: dict[str, object] = {}
    with open_dict(cfg):
        if cfg.trainer.get("precision") == AUTO:
            cfg.trainer.precision = chosen["trainer.precision"] = fast_precision(on_cuda)
        if cfg.get("channels_last", False) == AUTO:
            cfg.channels_last = chosen["channels_last"] = on_cuda
        if cfg.get("matmul_precision") == AUTO:
            cfg.matmul_precision = chosen["matmul_precision"] = "high" if on_cuda else None
    for key, accepted in (("channels_last", "true, false or auto"), ("compile", "true or false")):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be {accepted}, got {value!r}")
    matmul = cfg.get("matmul_precision")
    if matmul not in (None, "highest", "high", "medium"):
        raise ConfigError(f"matmul_precision must be auto, null, highest, high or medium, got {matmul!r}")
    if chosen:
        log.info("fast defaults for %s: %s", "this CUDA GPU" if on_cuda else "CPU", chosen)
    return chosen
