"""Benchmark: which precision and memory format train fastest, by model size — the table behind ``auto``.

    python -m benchmarks defaults --device cpu --repeats 3          # the README's CPU table
    python -m benchmarks defaults --device cuda --repeats 5         # the same ladder on a GPU

For a ladder of models from a toy ConvNet to a CIFAR ResNet-56 / torchvision ResNet-18, each at its training
batch size, times training steps (forward, cross-entropy, backward, SGD with momentum) in four settings —
fp32 NCHW, fp32 channels-last, bf16 autocast NCHW, bf16 autocast channels-last — alternated round by round,
median of ``--repeats`` rounds of ``--steps`` steps after a warm-up. Prints per model its forward GFLOPs a
training batch, ms a step per setting, each setting's ratio to fp32 NCHW, and what ``auto`` picks there
(``pruneflow.experiment.device_defaults``); a row where ``auto``'s pick is slower than fp32 NCHW by more than
the noise (``--tolerance``) is flagged: the rule's threshold is wrong for this device. ``--json`` writes
every figure (``python -m benchmarks gpu`` runs this ladder and suggests the CUDA thresholds from it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pruneflow.experiment.device_defaults import fast_channels_last, fast_precision, training_batch_gflops
from pruneflow.models import VGG, ConvNet, ResNet, torchvision_classifier

SETTINGS = {"fp32/nchw": (False, False), "fp32/cl": (False, True), "bf16/nchw": (True, False), "bf16/cl": (True, True)}
SMALL_VGG = [32, "M", 64, "M", 128, 128, "M", 256, 256, "M"]


def ladder(quick: bool) -> list[tuple[str, Any, tuple[int, int, int], int]]:
    """(name, model factory, input shape, batch size), smallest first."""
    models = [
        ("convnet-tiny", lambda: ConvNet((1, 16, 16), 10, channels=(4, 8)), (1, 16, 16), 32),
        ("convnet-mnist", lambda: ConvNet((1, 28, 28), 10), (1, 28, 28), 128),
        ("vgg-small-cifar", lambda: VGG((3, 32, 32), 10, layers=SMALL_VGG), (3, 32, 32), 128),
        ("resnet20-cifar", lambda: ResNet((3, 32, 32), 10, depth=20), (3, 32, 32), 128),
    ]
    if not quick:
        models += [
            ("resnet56-cifar", lambda: ResNet((3, 32, 32), 10, depth=56), (3, 32, 32), 128),
            ("resnet18-cifar", lambda: torchvision_classifier("resnet18", (3, 32, 32), 10, cifar_stem=True),
             (3, 32, 32), 128),
        ]  # fmt: skip
    return models


def time_setting(model: torch.nn.Module, shape: tuple[int, ...], batch: int, bf16: bool, channels_last: bool,
                 device: torch.device, steps: int, min_seconds: float = 0.3) -> float:  # fmt: skip
    """Mean ms a step over at least ``steps`` steps spanning ``min_seconds`` (the caller takes medians over rounds)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, *shape, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # allocator, kernel selection, autocast's weight cache
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, done = time.perf_counter(), 0
    while done < steps or time.perf_counter() - started < min_seconds:
        step()
        done += 1
        if device.type == "cuda" and done == steps:
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1e3 / done


def measure(device: torch.device, repeats: int, steps: int, quick: bool, tolerance: float) -> list[dict[str, Any]]:
    rows = []
    for name, factory, shape, batch in ladder(quick):
        torch.manual_seed(0)
        reference = factory()
        gflops = training_batch_gflops(reference, shape, batch)
        samples: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
        order = list(SETTINGS)
        for repeat in range(repeats):
            for setting in order if repeat % 2 == 0 else order[::-1]:
                torch.manual_seed(0)
                samples[setting].append(time_setting(factory(), shape, batch, *SETTINGS[setting], device, steps))
        ms = {setting: statistics.median(values) for setting, values in samples.items()}
        on_cuda = device.type == "cuda"
        auto = f"{'bf16' if fast_precision(on_cuda, gflops) == 'bf16-mixed' else 'fp32'}/" \
               f"{'cl' if fast_channels_last(on_cuda, gflops) else 'nchw'}"  # fmt: skip
        ratio = {setting: ms["fp32/nchw"] / value for setting, value in ms.items()}  # > 1: faster than fp32 NCHW
        best = max(ratio, key=ratio.__getitem__)
        rows.append({"model": name, "batch": batch, "gflops_per_batch": gflops, "ms": ms, "speedup": ratio,
                     "auto": auto, "best": best, "auto_slower": ratio[auto] < 1 - tolerance})  # fmt: skip
        print_row(rows[-1])
    return rows


def print_row(row: dict[str, Any]) -> None:
    cells = "".join(f"{row['ms'][s]:>10.2f} ({row['speedup'][s]:.2f}x)" for s in SETTINGS)
    flag = "  <- auto slower than fp32 NCHW" if row["auto_slower"] else ""
    print(f"{row['model']:<17}{row['batch']:>6}{row['gflops_per_batch']:>9.3g}{cells}  auto={row['auto']:<10}"
          f"best={row['best']}{flag}", flush=True)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: leave them)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="noise allowed before auto counts as slower")
    parser.add_argument("--quick", action="store_true", help="the four smallest models only")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'model':<17}{'batch':>6}{'GFLOPs':>9}" + "".join(f"{s:>18}" for s in SETTINGS) + "  (ms a step, speedup)")
    rows = measure(torch.device(args.device), args.repeats, args.steps, args.quick, args.tolerance)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    if any(row["auto_slower"] for row in rows):
        raise SystemExit("benchmarks defaults: auto chose a setting slower than fp32 NCHW; see the flagged rows")



