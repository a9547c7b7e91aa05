"""Benchmark: fine-tuning a pruned network with its masks on, or cut out of it while training (``mask.cut_at_epoch``).

    python -m benchmarks cut-training --root ../shared/data --repeats 3

Both arms prune 50 % of every conv's channels (``mask=activation mask.reset_optimizer_state=true``, L1)
after epoch 1, then fine-tune 4 more epochs; the ``cut`` arm cuts the pruned channels out at the start of
epoch 1 and fine-tunes the physically smaller network. Studies: MNIST with the ConvNet, the CIFAR-10 subset
(``data=cifar10 data.verify=false``) with the VGG. Each repeat runs both arms as fresh ``train.py``
processes, one after the other (their order alternates between repeats), so a loaded machine slows both.

Per run: training samples/s in the fine-tuning phase (a ``TrainingThroughput`` whose warm-up ends
``--skip`` steps after the cut) and samples per CPU-second of the process in the same window (the work
per sample: on a machine shared with other work, wall time mixes in everyone's load), whole-run
``fit_seconds``, final test accuracy, and from the cut arm the FLOPs and parameter ratios (before /
after, per image). Printed: medians over repeats and the median of the per-repeat ratios, against the
target (fine-tuning faster by ≥ 0.7 × the FLOPs ratio); ``--json`` writes every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import run_train

FINETUNE_WINDOW = "+callbacks.finetune_throughput"
TARGET_SHARE = 0.7  # of the FLOPs ratio


def study_overrides(name: str, root: Path, limit_train: int | None, val_size: int) -> tuple[list[str], int]:
    """(train.py overrides, training images per epoch) of a study."""
    if name == "mnist":
        overrides, images = [f"data.root={root}"], 60_000
    elif name == "cifar10":
        overrides = ["data=cifar10", f"data.root={root / 'CIFAR10-subset'}", "data.verify=false", "model=vgg"]
        images = 4_000  # the subset's data_batch_1
    else:
        raise SystemExit(f"unknown study {name!r}; choose from mnist, cifar10")
    overrides.append(f"data.val_size={val_size}")
    images -= val_size
    if limit_train is not None:
        overrides.append(f"data.limit_train={limit_train}")
        images = min(images, limit_train)
    return overrides, images


def one_run(overrides: list[str], run_dir: Path, steps_per_epoch: int, batch_size: int, skip: int) -> dict[str, Any]:
    warmup = steps_per_epoch + skip
    window = [f"{FINETUNE_WINDOW}._target_=pruneflow.callbacks.TrainingThroughput",
              f"{FINETUNE_WINDOW}.warmup_steps={warmup}"]  # fmt: skip
    metrics, _ = run_train([*overrides, *window], run_dir)
    measured = metrics["perf/train_samples_measured"]
    # The fine-tuning window's figure (the later callback's): no more samples than the steps after the warm-up.
    assert measured <= (4 * steps_per_epoch - skip) * batch_size, metrics
    return {
        "finetune_samples_per_s": metrics["perf/train_samples_per_s"],
        "finetune_samples_per_cpu_s": measured / metrics["perf/train_cpu_seconds_measured"],
        "fit_seconds": metrics["fit_seconds"],
        "test_acc": metrics["test/acc"],
        "flops_ratio": metrics.get("cut/flops_ratio"),
        "params_ratio": metrics.get("cut/params_ratio"),
        "cut_step": metrics.get("cut/step"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw and CIFAR10-subset/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", default="mnist,cifar10")
    parser.add_argument("--limit-train", type=int, default=None, help="training images per epoch (data.limit_train)")
    parser.add_argument("--val-size", type=int, default=1000, help="validation images carved from the training set")
    parser.add_argument("--skip", type=int, default=2, help="fine-tuning steps after the cut left out of samples/s")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    batch_size = 128  # both data configs' default
    arms = {
        "masked": ["mask=activation", "mask.amount=0.5", "mask.at_epoch=1", "mask.reset_optimizer_state=true"],
    }
    arms["cut"] = [*arms["masked"], "mask.cut_at_epoch=1"]
    report: dict[str, Any] = {"load_average_at_start": os.getloadavg(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        for study in args.studies.split(","):
            overrides, images = study_overrides(study, root, args.limit_train, args.val_size)
            steps_per_epoch = math.ceil(images / batch_size)
            overrides += ["trainer.max_epochs=5", "trainer.enable_model_summary=false"]
            runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
            for repeat in range(args.repeats):
                order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
                for arm in order:
                    run = one_run([*overrides, *arms[arm]], Path(scratch) / f"{study}-{arm}-{repeat}",
                                  steps_per_epoch, batch_size, args.skip)  # fmt: skip
                    runs[arm].append(run)
                    print(f"{study} repeat {repeat} {arm:>6}: {run['finetune_samples_per_s']:.1f} samples/s "
                          f"fine-tuning, fit {run['fit_seconds']:.1f} s, test acc {run['test_acc']:.4f}",
                          flush=True)  # fmt: skip
            report[study] = summarise(study, runs)
            report[study]["runs"] = runs
            report[study]["command_overrides"] = overrides
    report["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {report['load_average_at_start']}, at end "
          f"{report['load_average_at_end']}, on {report['cores']} cores")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def summarise(study: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    masked, cut = runs["masked"], runs["cut"]
    speedups = [c["finetune_samples_per_s"] / m["finetune_samples_per_s"] for m, c in zip(masked, cut, strict=True)]
    cpu = [c["finetune_samples_per_cpu_s"] / m["finetune_samples_per_cpu_s"] for m, c in zip(masked, cut, strict=True)]
    wall = [m["fit_seconds"] / c["fit_seconds"] for m, c in zip(masked, cut, strict=True)]
    flops_ratio = statistics.median(c["flops_ratio"] for c in cut)
    summary = {
        "masked_finetune_samples_per_s": statistics.median(r["finetune_samples_per_s"] for r in masked),
        "cut_finetune_samples_per_s": statistics.median(r["finetune_samples_per_s"] for r in cut),
        "finetune_speedup": statistics.median(speedups),
        "masked_finetune_samples_per_cpu_s": statistics.median(r["finetune_samples_per_cpu_s"] for r in masked),
        "cut_finetune_samples_per_cpu_s": statistics.median(r["finetune_samples_per_cpu_s"] for r in cut),
        "finetune_cpu_speedup": statistics.median(cpu),
        "masked_fit_seconds": statistics.median(r["fit_seconds"] for r in masked),
        "cut_fit_seconds": statistics.median(r["fit_seconds"] for r in cut),
        "fit_speedup": statistics.median(wall),
        "masked_test_acc": statistics.median(r["test_acc"] for r in masked),
        "cut_test_acc": statistics.median(r["test_acc"] for r in cut),
        "flops_ratio": flops_ratio,
        "params_ratio": statistics.median(c["params_ratio"] for c in cut),
    }
    summary["target_speedup"] = TARGET_SHARE * flops_ratio
    summary["target_met"] = summary["finetune_speedup"] >= summary["target_speedup"]
    print(
        f"\n{study}: median of {len(speedups)} repeats (masked | cut); per-repeat fine-tuning speedups "
        f"{', '.join(f'×{value:.2f}' for value in speedups)}"
    )
    print(
        f"  fine-tuning samples/s   {summary['masked_finetune_samples_per_s']:>9.1f} | "
        f"{summary['cut_finetune_samples_per_s']:.1f}   speedup ×{summary['finetune_speedup']:.2f} "
        f"(FLOPs ratio ×{flops_ratio:.2f}; target ≥ ×{summary['target_speedup']:.2f}: "
        f"{'met' if summary['target_met'] else 'NOT met'})"
    )
    print(
        f"  per CPU-second          {summary['masked_finetune_samples_per_cpu_s']:>9.1f} | "
        f"{summary['cut_finetune_samples_per_cpu_s']:.1f}   speedup ×{summary['finetune_cpu_speedup']:.2f} "
        f"(samples per CPU-second of the process: the work per sample, less sensitive to others' load)"
    )
    print(
        f"  whole fit, seconds      {summary['masked_fit_seconds']:>9.1f} | {summary['cut_fit_seconds']:.1f}"
        f"   ×{summary['fit_speedup']:.2f}"
    )
    print(f"  final test accuracy     {summary['masked_test_acc']:>9.4f} | {summary['cut_test_acc']:.4f}")
    print(f"  parameters ratio        ×{summary['params_ratio']:.2f}\n", flush=True)  # fmt: skip
    return summary
