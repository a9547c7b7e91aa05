"""Benchmark: images/second of pruneflow's in-memory data pipeline vs torchvision's best configuration here.

Ours: uint8 tensors in memory, batches cut by indexing (``TensorBatches``), then the datamodule's
``transform_batch`` (what ``on_after_batch_transfer`` runs): normalisation, and for CIFAR-10 random
crop (padding 4) + horizontal flip, on whole batches. Theirs: ``torchvision.datasets.X(transform=
Compose([ToTensor(), Normalize()]))`` (with ``RandomCrop(32, padding=4), RandomHorizontalFlip()``
in front for CIFAR-10) and ``DataLoader(batch_size=128, shuffle=True, num_workers=--workers,
persistent_workers=True, pin_memory=<on a GPU>)`` — worker processes decoding in parallel, kept alive
across epochs, batches in pinned memory on a GPU: torchvision's fastest usual setup, not its slowest.
Both read the same images (the whole official training set, no validation split); the arms alternate
in one process, in alternating order (A B, B A, ...), each counts the images it delivered (checked to be
the whole set, every epoch), and the median epoch counts after a warm-up epoch each.

    python -m benchmarks data --dataset all --root ../shared/data \\
        --cifar-root ../shared/data/CIFAR10-subset --epochs 5 --json bench_data.json
"""

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pruneflow.data import CIFAR10DataModule, InMemoryImageDataModule, MNISTDataModule


class AsFoundCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 reading the batch files that are present, without its md5 check.

    The baseline must read the same images as ours, and a partial folder fails that check.
    """

    def __init__(self, root: Path, batches: list[str], **kwargs) -> None:
        self.train_list = [[name, None] for name in batches]
        super().__init__(root, train=True, **kwargs)

    def _check_integrity(self) -> bool:
        return True


def ours(datamodule: InMemoryImageDataModule, device: torch.device) -> Callable[[int], int]:
    loader = datamodule.train_dataloader()

    def run_epoch(epoch: int) -> int:
        loader.epoch = lambda: epoch
        seen = 0
        for batch_idx, (images, labels) in enumerate(loader):
            batch = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            images, labels = datamodule.transform_batch(batch, train=True, epoch=epoch, batch_idx=batch_idx)
            seen += len(labels)
        return seen

    return run_epoch


def torchvision_loader(dataset: Iterable, device: torch.device, batch_size: int, workers: int) -> Callable[[int], int]:
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )  # fmt: skip

    def run_epoch(epoch: int) -> int:
        seen = 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            seen += len(labels)
        return seen

    return run_epoch


def pipelines(name: str, args: argparse.Namespace) -> tuple[Callable[[int], int], Callable[[int], int], int]:
    """(ours, torchvision's) epoch functions over the same training images of data set ``name``, and their count."""
    device = torch.device(args.device)
    if name == "mnist":
        datamodule = MNISTDataModule(args.root, val_size=0, batch_size=args.batch_size)
        datamodule.setup("fit")
        steps = [transforms.ToTensor(), transforms.Normalize(datamodule.mean, datamodule.std)]
        dataset = datasets.MNIST(args.root, train=True, transform=transforms.Compose(steps))
    else:
        datamodule = CIFAR10DataModule(args.cifar_root, verify=False, val_size=0, batch_size=args.batch_size)
        datamodule.setup("fit")
        steps = [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(datamodule.mean, datamodule.std),
        ]
        dataset = AsFoundCIFAR10(args.cifar_root, datamodule.batches_found, transform=transforms.Compose(steps))
    assert len(dataset) == len(datamodule.train_images), "both pipelines must read the same images"
    return ours(datamodule, device), torchvision_loader(dataset, device, args.batch_size, args.workers), len(dataset)


def timed(run_epoch: Callable[[int], int], epoch: int, device: torch.device) -> tuple[float, int]:
    start = time.perf_counter()
    seen = run_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, seen


def bench(name: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    ours_epoch, torchvision_epoch, expected = pipelines(name, args)
    runs = {"pruneflow": ours_epoch, "torchvision": torchvision_epoch}
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    images: dict[str, list[int]] = {key: [] for key in runs}
    for epoch in range(args.warmup + args.epochs):
        order = list(runs) if epoch % 2 == 0 else list(reversed(runs))  # alternate who goes first
        for key in order:
            elapsed, seen = timed(runs[key], epoch, device)
            if seen != expected:
                raise SystemExit(f"benchmarks data: error: {key} gave {seen} images in epoch {epoch}, not {expected}")
            if epoch >= args.warmup:
                seconds[key].append(elapsed)
                images[key].append(seen)
    rate = {key: statistics.median(n / t for n, t in zip(images[key], seconds[key], strict=True)) for key in runs}
    return {
        "dataset": name,
        "augment": name == "cifar10",
        "images_per_epoch": expected,
        "epoch_seconds": seconds,
        "images_per_second": rate,
        "speedup": rate["pruneflow"] / rate["torchvision"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=["mnist", "cifar10", "all"], default="all")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("PRUNEFLOW_DATA", "./data")))
    parser.add_argument("--cifar-root", type=Path, default=None, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per pipeline (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per pipeline first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="where batches are transformed, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="torchvision DataLoader worker processes (default: the cores, at most 4)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def run(args: argparse.Namespace) -> None:
    if args.epochs < 1 or args.warmup < 0:
        raise SystemExit(f"benchmarks data: error: --epochs must be >= 1 and --warmup >= 0, got {args.epochs} and "
                         f"{args.warmup}")
    args.cifar_root = args.cifar_root or args.root
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    names = ["mnist", "cifar10"] if args.dataset == "all" else [args.dataset]
    results = [bench(name, args) for name in names]

    print(f"\n{args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, torchvision with "
          f"{args.workers} workers, median of {args.epochs}")  # fmt: skip
    print(f"{'dataset':<10}{'images':>9}{'pruneflow img/s':>18}{'torchvision img/s':>20}{'speedup':>10}")
    for result in results:
        rate = result["images_per_second"]
        print(
            f"{result['dataset']:<10}{result['images_per_epoch']:>9,}{rate['pruneflow']:>18,.0f}"
            f"{rate['torchvision']:>20,.0f}{result['speedup']:>9.1f}x"
        )
    if args.json:
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        environment = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        }
        args.json.write_text(json.dumps({"config": config, "environment": environment, "results": results}, indent=2))
        print(f"wrote {args.json}")



