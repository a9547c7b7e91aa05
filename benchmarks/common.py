"""What the benchmarks share: running ``python train.py`` as a user would, reading its figures, checking that
an arm did what it claims before its speed is reported, and running one model's measurement in a fresh process
under a time limit (``isolated``), so that one that hangs or dies is a row of a list, not its end.

Each run is a fresh process in a scratch run folder; its figures come from the run's
``metrics.json`` (``perf/train_samples_per_s`` from ``pruneflow.callbacks.TrainingThroughput``, the
test-accuracy curve from ``pruneflow.callbacks.AccuracyCurve``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CURVE = "+callbacks.accuracy_curve._target_=pruneflow.callbacks.AccuracyCurve"


def run_train(
    overrides: list[str], run_dir: Path, progress_bar: bool = False, timeout: float = 3600
) -> tuple[dict[str, Any], float]:
    """Run ``python train.py <overrides>`` in ``run_dir``; returns (its metrics.json, time.time() at launch).

    ``progress_bar``: leave the default progress bar on (into a pipe). A failing run raises with the
    tail of its output, so a benchmark never reports a broken run's figures.
    """
    command = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    if not progress_bar:
        command.append("trainer.enable_progress_bar=false")
    launched = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{tail}")
    return json.loads((run_dir / "metrics.json").read_text()), launched


def seconds_to_accuracy(curve: list[dict[str, float]], target: float, launched: float) -> float | None:
    """Wall seconds from the process launch to the first curve point at ``target`` test accuracy or above
    (the curve's own evaluations left out); None if the run never got there."""
    for point in curve:
        if point["acc"] >= target:
            return point["time"] - launched
    return None


def seconds_to_stay_at_accuracy(curve: list[dict[str, float]], target: float, launched: float) -> float | None:
    """Like ``seconds_to_accuracy``, to the first point from which every later point stays at ``target``."""
    for index, point in enumerate(curve):
        if all(later["acc"] >= target for later in curve[index:]):
            return point["time"] - launched
    return None


def print_curve(curve: list[dict[str, float]], launched: float) -> None:
    print(f"  {'wall s':>8}{'step':>7}{'epoch':>7}{'test acc':>10}")
    for point in curve:
        print(f"  {point['time'] - launched:>8.1f}{point['step']:>7}{point['epoch']:>7}{point['acc']:>10.4f}")


class ArmError(RuntimeError):
    """An arm did not do what it claims (not pruned, a non-finite loss, a missing figure): its speed means nothing."""


def check_arm(arm: str, metrics: dict[str, Any], pruned: bool, figures: tuple[str, ...] = ()) -> None:
    """Raise ``ArmError`` unless the run's loss is finite, it pruned channels exactly when ``pruned``, and
    every key of ``figures`` is in its metrics."""
    loss = metrics.get("test/loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        raise ArmError(f"{arm}: test loss is {loss!r}, not a finite number")
    channels = sum((metrics.get("mask/pruned_channels") or {}).values())
    if pruned and channels == 0:
        raise ArmError(f"{arm}: claims to prune but pruned no channel")
    if not pruned and channels:
        raise ArmError(f"{arm}: claims not to prune but pruned {channels} channels")
    missing = [key for key in figures if metrics.get(key) is None]
    if missing:
        raise ArmError(f"{arm}: the run reported no {', '.join(missing)}")


def one_line(error: BaseException) -> str:
    """The exception's type and first line, and where it was raised (a crash inside torch's FLOP counter is
    not one inside the channel graph)."""
    text = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {text[0][:140] if text else ''}{where}"


def _report(task: Callable[..., dict[str, Any]], args: tuple[Any, ...], results: Any) -> None:
    """Runs in the child process: ``task``'s row, or the one line of its exception, sent back."""
    try:
        results.put(("row", task(*args)))
    except BaseException as error:  # any failure is a result here, not the end of the list
        results.put(("error", one_line(error)))


def isolated(task: Callable[..., dict[str, Any]], args: tuple[Any, ...], limit: float) -> tuple[str, Any]:
    """``task(*args)`` in a fresh process: ("row", its row), ("error", one line) where it raised or died, or
    ("timeout", ...) after ``limit`` seconds; in this process where ``limit`` is 0."""
    if not limit:
        try:
            return "row", task(*args)
        except Exception as error:
            return "error", one_line(error)
    context = multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    process = context.Process(target=_report, args=(task, args, results), daemon=True)
    process.start()
    deadline = time.monotonic() + limit
    while process.is_alive() and results.empty() and time.monotonic() < deadline:
        process.join(0.2)
    if not results.empty():
        outcome = results.get()
        process.join(5)
        if process.is_alive():
            process.kill()
        return outcome
    if process.is_alive():
        process.kill()
        process.join()
        return "timeout", f"over {limit:.0f} s"
    return "error", f"the process died (exit code {process.exitcode})"
