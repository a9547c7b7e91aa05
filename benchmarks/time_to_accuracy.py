"""Benchmark: wall seconds from ``python train.py`` launch to a test accuracy, with the accuracy curve.

    python -m benchmarks time-to-accuracy --root ../shared/data --repeats 3

Two studies, each a fresh ``train.py`` process per repetition, timed from launch (interpreter start,
imports, data loading, training) to the first point of its test-accuracy curve at the target:

- MNIST, the default config (ConvNet, 2 epochs, SGD + cosine): target 99.0 %;
- Fashion-MNIST, ``data=fashion_mnist trainer.max_epochs=<--fashion-epochs>``: target 91.0 %.

The curve (``pruneflow.callbacks.AccuracyCurve``) evaluates the whole test split every
``--every-n-steps`` steps and at the end; its evaluations are left out of the clock. Each run is
checked first (finite loss, no pruning: the default config has none). Prints each curve, the median
time to first reach the target and the median time from which every later point stays at it;
``--json`` writes everything. A run that never reaches its target is a failure: the script says which
and exits with status 1 (a median over the runs that got there would hide it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import (
    CURVE,
    check_arm,
    print_curve,
    run_train,
    seconds_to_accuracy,
    seconds_to_stay_at_accuracy,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="../shared/data", help="folder holding MNIST/raw and FashionMNIST/raw")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every-n-steps", type=int, default=100)
    parser.add_argument("--fashion-epochs", type=int, default=4)
    parser.add_argument("--studies", default="mnist,fashion_mnist")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:
    root = str(Path(args.root).resolve())
    studies = {
        "mnist": (0.99, [f"data.root={root}"]),
        "fashion_mnist": (
            0.91,
            [f"data.root={root}", "data=fashion_mnist", f"trainer.max_epochs={args.fashion_epochs}"],
        ),
    }
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.studies.split(","):
            target, overrides = studies[name]
            overrides = [*overrides, CURVE, f"+callbacks.accuracy_curve.every_n_steps={args.every_n_steps}"]
            runs = []
            for repeat in range(args.repeats):
                metrics, launched = run_train(overrides, Path(scratch) / f"{name}{repeat}")
                check_arm(f"{name} repeat {repeat}", metrics, pruned=False, figures=("curve/test_acc",))
                seconds = seconds_to_accuracy(metrics["curve/test_acc"], target, launched)
                stays = seconds_to_stay_at_accuracy(metrics["curve/test_acc"], target, launched)
                print(f"{name} repeat {repeat}: {'never' if seconds is None else f'{seconds:.1f} s'} to "
                      f"{target:.1%}; final test acc {metrics['test/acc']:.4f}", flush=True)  # fmt: skip
                print_curve(metrics["curve/test_acc"], launched)
                runs.append({"seconds_to_target": seconds, "seconds_to_stay": stays, "test_acc": metrics["test/acc"],
                             "curve": metrics["curve/test_acc"], "launched": launched,
                             "samples_per_s": metrics.get("perf/train_samples_per_s")})  # fmt: skip
            reached = [run["seconds_to_target"] for run in runs if run["seconds_to_target"] is not None]
            median = statistics.median(reached) if reached and len(reached) == len(runs) else None
            staying = [run["seconds_to_stay"] for run in runs if run["seconds_to_stay"] is not None]
            median_stay = statistics.median(staying) if staying and len(staying) == len(runs) else None
            report[name] = {"target": target, "overrides": overrides, "median_seconds": median,
                            "median_seconds_to_stay": median_stay, "runs": runs}  # fmt: skip
    print(f"\n{'study':<16}{'target':>8}{'median s to reach':>19}{'median s to stay':>18}{'runs reaching it':>18}")
    for name, study in report.items():
        reached = f"{sum(run['seconds_to_target'] is not None for run in study['runs'])}/{len(study['runs'])}"
        median = "FAILED" if study["median_seconds"] is None else f"{study['median_seconds']:.1f}"
        stay = "not all" if study["median_seconds_to_stay"] is None else f"{study['median_seconds_to_stay']:.1f}"
        print(f"{name:<16}{study['target']:>8.1%}{median:>19}{stay:>18}{reached:>18}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failures = unreached(report)
    if failures:
        raise SystemExit("benchmarks time-to-accuracy: error: " + "; ".join(failures))


def unreached(report: dict) -> list[str]:
    """One line per study whose runs did not all reach the target."""
    failures = []
    for name, study in report.items():
        missed = [index for index, run in enumerate(study["runs"]) if run["seconds_to_target"] is None]
        if missed:
            finals = ", ".join(f"{study['runs'][index]['test_acc']:.4f}" for index in missed)
            failures.append(f"{name}: repeats {missed} never reached {study['target']:.1%} (final test acc {finals})")
    return failures
