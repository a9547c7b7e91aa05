"""Benchmark: the strategy sweep on a GPU — images/s and time to accuracy, eager against compiled.

On a machine with a GPU, where ../shared/data is absent, with a local copy of the data sets:

    cp -r <data sets> .device_data                 # ignored by git; the default --root when present
    python -m benchmarks gpu --root .device_data --json gpu.json

and the same script on CPU, sized to finish in minutes:

    python -m benchmarks gpu --device cpu --quick --root ../shared/data

Every arm is one ``python train.py`` process with the fast defaults of its device (on a CUDA GPU:
bf16-mixed, channels-last, TF32 matmuls, data tensors on the GPU), pruning 50 % of every prunable
conv at the first step by ``mask=<strategy>`` (``disabled``: no pruning callback at all), with
``compile=false`` and ``compile=true``. Both modes train on the same batches: ``data.drop_last=true``
for both (compiled runs drop the last, smaller batch so as not to compile a second graph). Arms run
``--repeats`` times, in alternating order (forwards, then backwards), and the medians are reported.
Each run is checked before its speed counts: a finite loss, pruned channels exactly when a mask is on,
every figure present, and a test accuracy of at least ``--min-acc`` of the target (a broken arm fails
the script instead of printing 0). Studies:

- ``mnist``: the default ConvNet config (2 epochs), target 99.0 % test accuracy;
- ``cifar10``: the CIFAR-10 subset in ``<root>/CIFAR10-subset`` (4,000 images), a small VGG with
  augmentation on the device, ``--cifar-epochs`` epochs, target ``--cifar-target``.

Reported per arm: training samples/s (after a 20-step warm-up, so compilation is not in it), seconds
from launch to the target (compilation included: that is what a user waits for), final test accuracy,
fit seconds. A table per study, and ``--json`` with every figure.

``--suite`` measures instead every GPU figure of the project in one call of at most about 8 minutes
(host syncs on ordinary steps, overhead against a hand-written loop and plain Lightning, CUDA graphs,
start-up, compaction latency, a cut's fine-tuning speedup, the precision/memory-format table): see
``benchmarks/gpu_suite.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import CURVE, REPO, ArmError, check_arm, run_train, seconds_to_accuracy

STRATEGIES = ["disabled", "control", "weight", "activation", "gradient", "parametrize", "hard"]
SMALL_VGG = "model.layers=[32,M,64,M,128,128,M,256,256,M]"


def study_overrides(name: str, root: Path, args: argparse.Namespace) -> tuple[float, list[str]]:
    if name == "mnist":
        overrides = [f"data.root={root}", f"trainer.max_epochs={1 if args.quick else 2}"]
        if args.quick:
            overrides.append("data.limit_train=12000")
        return 0.99, overrides
    if name == "cifar10":
        overrides = [
            "data=cifar10", f"data.root={root / 'CIFAR10-subset'}", "data.verify=false", "model=vgg", SMALL_VGG,
            f"trainer.max_epochs={2 if args.quick else args.cifar_epochs}",
        ]  # fmt: skip
        return args.cifar_target, overrides
    raise SystemExit(f"benchmarks gpu: error: unknown study {name!r}; choose mnist or cifar10")


def run_arm(
    study: str, strategy: str, compiled: bool, args: argparse.Namespace, scratch: Path, repeat: int
) -> dict[str, Any]:
    target, overrides = study_overrides(study, Path(args.root).resolve(), args)
    accelerator = "cpu" if args.device == "cpu" else "gpu"
    overrides = [
        *overrides, f"mask={strategy}", f"compile={str(compiled).lower()}", f"trainer.accelerator={accelerator}",
        "data.drop_last=true", CURVE, f"+callbacks.accuracy_curve.every_n_steps={args.every_n_steps}",
    ]  # fmt: skip
    arm = f"{study}-{strategy}-{'compiled' if compiled else 'eager'}"
    metrics, launched = run_train(overrides, scratch / f"{arm}-{repeat}")
    check_arm(arm, metrics, pruned=strategy != "disabled", figures=("perf/train_samples_per_s", "curve/test_acc"))
    if metrics["test/acc"] < args.min_acc * target:
        raise ArmError(f"{arm}: test accuracy {metrics['test/acc']:.4f} is below {args.min_acc} x the target {target}")
    return {
        "study": study, "strategy": strategy, "compiled": compiled, "target": target, "overrides": overrides,
        "repeat": repeat,
        "samples_per_s": metrics.get("perf/train_samples_per_s"),
        "seconds_to_target": seconds_to_accuracy(metrics["curve/test_acc"], target, launched),
        "test_acc": metrics["test/acc"], "fit_seconds": metrics["fit_seconds"], "curve": metrics["curve/test_acc"],
    }  # fmt: skip


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm, in first-run order: medians of samples/s, seconds to target and test accuracy."""
    arms: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for run in runs:
        arms.setdefault((run["strategy"], run["compiled"]), []).append(run)
    rows = []
    for repeats in arms.values():
        reached = [run["seconds_to_target"] for run in repeats]
        rows.append(repeats[0] | {
            "repeats": len(repeats),
            "samples_per_s": statistics.median(run["samples_per_s"] for run in repeats),
            "seconds_to_target": None if None in reached else statistics.median(reached),
            "test_acc": statistics.median(run["test_acc"] for run in repeats),
            "fit_seconds": statistics.median(run["fit_seconds"] for run in repeats),
        })  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    eager = {row["strategy"]: row["samples_per_s"] for row in rows if not row["compiled"]}
    baseline = eager.get("disabled")
    print(f"\n{rows[0]['study']} (target {rows[0]['target']:.1%}; medians of {rows[0]['repeats']})")
    print(f"{'mask':<13}{'mode':<10}{'samples/s':>11}{'vs eager, no mask':>19}{'s to target':>13}"
          f"{'test acc':>10}{'fit s':>8}")  # fmt: skip
    for row in rows:
        ratio = f"{row['samples_per_s'] / baseline:.3f}" if baseline else "-"
        reached = "never" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.1f}"
        mode = "compiled" if row["compiled"] else "eager"
        print(f"{row['strategy']:<13}{mode:<10}{row['samples_per_s']:>11.0f}{ratio:>19}{reached:>13}"
              f"{row['test_acc']:>10.4f}{row['fit_seconds']:>8.1f}")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_root = REPO / ".device_data" if (REPO / ".device_data").is_dir() else REPO.parent / "shared" / "data"
    parser.add_argument("--root", default=str(default_root), help="folder holding MNIST/raw and CIFAR10-subset/")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--studies", default="mnist,cifar10")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--cifar-epochs", type=int, default=15)
    parser.add_argument("--cifar-target", type=float, default=0.55)
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="short runs (CPU smoke run): fewer epochs and images")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every arm, in alternating order")
    parser.add_argument("--min-acc", type=float, default=0.9, help="an arm below this fraction of the target fails")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--suite", action="store_true", help="every GPU figure in one call (benchmarks/gpu_suite.py)")
    parser.add_argument("--sections", default="", help="--suite: comma list of sections (default: all)")
    parser.add_argument("--tiny", action="store_true", help="--suite: every section shrunk to seconds (CPU dry run)")


def run(args: argparse.Namespace) -> None:
    if args.suite:
        from benchmarks.gpu_suite import run_suite

        args.root = str(Path(args.root).resolve())
        args.repeats = max(args.repeats, 1 if args.tiny else 3)
        run_suite(args)
        return
    strategies = args.strategies.split(",")
    modes = args.modes.split(",")
    for kind, given, accepted in (("strategy", strategies, STRATEGIES), ("mode", modes, ["eager", "compiled"])):
        unknown = [value for value in given if value not in accepted]
        if unknown:
            raise SystemExit(f"benchmarks gpu: error: unknown {kind} {unknown[0]!r}; choose from {', '.join(accepted)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("benchmarks gpu: error: --device cuda but no CUDA GPU is visible; use --device cpu")

    arms = [(strategy, mode == "compiled") for mode in modes for strategy in strategies]
    report: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for study in args.studies.split(","):
            runs = []
            for repeat in range(args.repeats):
                for strategy, compiled in arms if repeat % 2 == 0 else reversed(arms):
                    run = run_arm(study, strategy, compiled, args, Path(scratch), repeat)
                    summary = f"{run['samples_per_s']} samples/s, {run['seconds_to_target']} s to target"
                    print(f"{study} mask={strategy} compile={compiled} repeat {repeat}: {summary}", flush=True)
                    runs.append(run)
                    if args.json:  # after every arm: a run cut short keeps what it measured
                        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                                         "runs": report + runs}, indent=2, default=str))  # fmt: skip
            rows = median_rows(runs)
            print_table(rows)
            report += runs
            all_rows += rows
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": report,
                                                 "rows": all_rows}, indent=2, default=str))  # fmt: skip



