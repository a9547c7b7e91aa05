"""Benchmark: start-up — how long ``python train.py`` takes to finish its first training step, against
``python -c "import torch, lightning"`` (the floor any Lightning run pays).

    python -m benchmarks startup --root ../shared/data --repeats 5
    python -m benchmarks startup --root ../shared/data --repeats 5 --against ../pruneflow-before

Each repetition times ``import torch, lightning`` in a fresh process, then runs ``train.py`` (MNIST, the
default job on 2,000 images, no logger) in a fresh process and reads its ``perf/startup/*`` phases from
``metrics.json`` (``pruneflow.experiment.startup``: process start to the first step's end). Prints the
median of each phase and the ratio first step / imports (goal: ≤ 1.25 on CPU).

The decoded-data cache (``pruneflow.data.tensor_cache``) lives in a temporary folder: one untimed run per
checkout builds it (its phases are printed as the cold start), the timed runs then read it. ``--against``
names another checkout (``mkdir ../before && git archive <commit> | tar -x -C ../before``): its
``train.py`` runs alternately with this one's, round by round, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def time_imports() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, lightning"], check=True)
    return time.perf_counter() - started


def run_train(repo: Path, root: str, accelerator: str, run_dir: Path, cache: Path) -> dict[str, float]:
    """One ``train.py`` run of ``repo``'s checkout; its ``perf/startup*`` figures."""
    command = [sys.executable, str(repo / "train.py"), f"data.root={root}", "trainer.max_epochs=1",
               "data.limit_train=2000", f"trainer.accelerator={accelerator}", "~logger",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "PRUNEFLOW_CACHE": str(cache), "PYTHONPATH": str(repo)}
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=repo, env=env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key.startswith("perf/startup")}


def summary(runs: list[dict[str, float]], imports: list[float]) -> dict[str, Any]:
    ratios = [run["perf/startup_seconds"] / seconds for run, seconds in zip(runs, imports, strict=True)]
    return {"phases": {key: statistics.median(run[key] for run in runs) for key in runs[0]}, "runs": runs,
            "ratio_first_step_vs_imports": statistics.median(ratios), "ratios": ratios}  # fmt: skip


def measure(root: str, device: str = "cpu", repeats: int = 3, against: Path | None = None) -> dict[str, Any]:
    accelerator = "gpu" if device == "cuda" else "cpu"
    repos = {"this": REPO, **({"against": against} if against else {})}
    imports: list[float] = []
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in repos}
    cold: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, repo in repos.items():  # untimed: builds each checkout's data cache
            cold[name] = run_train(repo, root, accelerator, Path(scratch) / f"{name}-cold", Path(scratch) / name)
        for repeat in range(repeats):
            imports.append(time_imports())
            for name, repo in repos.items():
                run_dir = Path(scratch) / f"{name}-{repeat}"
                runs[name].append(run_train(repo, root, accelerator, run_dir, Path(scratch) / name))
    return {"import_torch_lightning_seconds": statistics.median(imports), "imports": imports, "cold": cold,
            **{name: summary(name_runs, imports) for name, name_runs in runs.items()}}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout whose train.py runs alternately with this one")
    parser.add_argument("--json", type=Path)


def run(args: argparse.Namespace) -> None:
    against = args.against.resolve() if args.against else None
    result = measure(str(Path(args.root).resolve()), args.device, args.repeats, against)
    names = ["this", *(["against"] if against else [])]
    print(f"{'median of ' + str(args.repeats):<40}" + "".join(f"{name:>10}" for name in names)
          + "".join(f"{'cold ' + name:>14}" for name in names))  # fmt: skip
    for key in result["this"]["phases"]:
        print(f"{key:<40}" + "".join(f"{result[name]['phases'].get(key, float('nan')):9.2f}s" for name in names)
              + "".join(f"{result['cold'][name].get(key, float('nan')):13.2f}s" for name in names))  # fmt: skip
    print(f"{'import torch, lightning':<40}{result['import_torch_lightning_seconds']:9.2f}s")
    for name in names:
        ratios = ", ".join(f"{ratio:.2f}" for ratio in result[name]["ratios"])
        print(f"first step / imports, {name}: {result[name]['ratio_first_step_vs_imports']:.2f} "
              f"(median of {args.repeats}: {ratios}; goal <= 1.25)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))



