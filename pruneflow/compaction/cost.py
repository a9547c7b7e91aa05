"""Cost figures of a model before and after compaction: parameters, FLOPs and latency where the model runs.

FLOPs are counted by ``torch.utils.flop_counter`` for one image (convolutions and matrix products;
BatchNorm, activations and pooling are not counted, though they cost time). Latency is wall time of
``torch.inference_mode`` forwards on the CPU, measured for all models in one process and alternated
round by round, so load from other jobs on a shared machine hits them alike; each figure is the
median over rounds. Models and inputs are put in one memory format, channels-last by default: it is
the faster layout for every model and batch size we measured on CPU, and in the default NCHW layout
max-pooling alone takes most of a small network's time (about 60 % of ConvNet's at batch 256), which
hides what the convolutions gained.

``device_latency_ms`` measures on the run's device: on CUDA with CUDA events around the timed forwards
(after a warm-up, so cuDNN's algorithm search and the allocator are out of it), under the run's autocast
precision and memory format; on CPU it is ``cpu_latency_ms``.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pruneflow.compaction.verify import evaluating
from pruneflow.errors import ConfigError
from pruneflow.graph.layers import attention_op_by_op

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()  # not inference_mode: torch < 2.6's FlopCounterMode sees no op under it and counts 0
def count_flops(model: nn.Module, image: Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``image`` (a batch of one). Through ``forward``, not ``__call__``: a
    network compiled in place and called under the FLOP counter (a dispatch mode) is skipped by torch.compile up to
    torch 2.11 ever after, so a cut while training, which counts the FLOPs it removed, would train on uncompiled.
    The parameters are counted with ``requires_grad`` off: the counter's module tracker hooks every module input
    that requires grad, and fails on one without a gradient function (a parameter expanded into a block's input,
    as timm's CaiT does with its class token). ``nn.MultiheadAttention`` is counted op by op
    (``attention_op_by_op``)."""
    with evaluating(model), _without_grad(model), attention_op_by_op(), FlopCounterMode(display=False) as counter:
        model.forward(image)
    return int(counter.get_total_flops())


@contextmanager
def _without_grad(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off on every parameter of ``model`` for the block, each flag restored afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)


@torch.inference_mode()
def cpu_latency_ms(
    models: Mapping[str, nn.Module],
    batch: Tensor,
    rounds: int = 7,
    threads: int | None = 1,
    memory_format: str = "channels_last",
    warmup: int = 2,
    min_seconds: float = 0.05,
) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``batch``, on CPU copies of the models.

    ``threads`` sets PyTorch's intra-op threads while timing (None: leave them). One by default: on a
    shared machine, threads that wait at each op's barrier for a core another job holds make
    multi-threaded timings swing by orders of magnitude. A timed sample repeats the forward until it
    spans ``min_seconds`` (a batch-1 forward is far below scheduling noise); the order of models flips
    every round. ``memory_format`` (``channels_last`` or ``contiguous``) applies to 4-d inputs.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"unknown memory format {memory_format!r}; choose one of: {', '.join(MEMORY_FORMATS)}")
    if rounds < 1:
        raise ConfigError(f"latency rounds must be >= 1, got {rounds}")
    if threads is not None and threads < 1:
        raise ConfigError(f"latency threads must be >= 1 or None, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        layout = MEMORY_FORMATS[memory_format] if batch.ndim == 4 else torch.contiguous_format
        cpu_models = {name: copy.deepcopy(m).cpu().eval().to(memory_format=layout) for name, m in models.items()}
        return _timed(cpu_models, batch.cpu().contiguous(memory_format=layout), rounds, warmup, min_seconds)
    finally:
        torch.set_num_threads(previous_threads)


def _timed(
    cpu_models: Mapping[str, nn.Module], batch: Tensor, rounds: int, warmup: int, min_seconds: float
) -> dict[str, float]:
    repeats = {}
    for name, model in cpu_models.items():
        for _ in range(warmup):
            model(batch)
        started = time.perf_counter()
        model(batch)
        repeats[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - started, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in cpu_models}
    order = list(cpu_models)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            model, count = cpu_models[name], repeats[name]
            started = time.perf_counter()
            for _ in range(count):
                model(batch)
            samples[name].append((time.perf_counter() - started) * 1e3 / count)
    return {name: statistics.median(values) for name, values in samples.items()}


AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@torch.inference_mode()
def device_latency_ms(
    models: Mapping[str, nn.Module],
    batch: Tensor,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    memory_format: str = "channels_last",
    rounds: int = 7,
    warmup: int = 3,
    min_seconds: float = 0.05,
    threads: int | None = 1,
) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``batch`` on ``device``, under the autocast of
    ``precision`` (Lightning's name: ``bf16-mixed``, ``16-mixed``; others run as stored): on CUDA timed by
    CUDA events, on CPU by ``cpu_latency_ms`` (which takes ``threads``)."""
    device = torch.device(device)
    dtype = AUTOCAST_DTYPES.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    if device.type != "cuda":
        with autocast:
            return cpu_latency_ms(models, batch, rounds=rounds, threads=threads, memory_format=memory_format,
                                  warmup=warmup, min_seconds=min_seconds)  # fmt: skip
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"unknown memory format {memory_format!r}; choose one of: {', '.join(MEMORY_FORMATS)}")
    layout = MEMORY_FORMATS[memory_format] if batch.ndim == 4 else torch.contiguous_format
    on_device = {name: copy.deepcopy(m).to(device).eval().to(memory_format=layout) for name, m in models.items()}
    inputs = batch.to(device).contiguous(memory_format=layout)
    repeats = {}
    with autocast:
        for name, model in on_device.items():
            for _ in range(warmup):
                model(inputs)
            repeats[name] = max(1, math.ceil(min_seconds * 1e3 / max(_cuda_ms(model, inputs, 1), 1e-3)))
        samples: dict[str, list[float]] = {name: [] for name in on_device}
        order = list(on_device)
        for round_index in range(rounds):
            for name in order if round_index % 2 == 0 else reversed(order):
                samples[name].append(_cuda_ms(on_device[name], inputs, repeats[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def _cuda_ms(model: nn.Module, inputs: Tensor, count: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        model(inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / count
