"""Benchmark: start-up — how long ``python train.py`` takes to finish its first training step, against
``python -c "import torch, lightning"`` (the floor any Lightning run pays).

    python scripts/bench_startup.py --root ../shared/data --repeats 3

Each repetition times ``import torch, lightning`` in a fresh process, then runs ``train.py`` (MNIST, the
default job on 2,000 images, no logger) in a fresh process and reads its ``perf/startup/*`` phases from
``metrics.json`` (``pruneflow.experiment.startup``: process start to the first step's end). Prints the
median of each phase and the ratio first step / imports (goal: ≤ 1.25 on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def measure(root: str, device: str = "cpu", repeats: int = 3) -> dict[str, Any]:
    imports, runs = [], []
    accelerator = "gpu" if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, lightning"], check=True)
            imports.append(time.perf_counter() - started)
            run_dir = Path(scratch) / f"run{repeat}"
            command = [sys.executable, str(REPO / "train.py"), f"data.root={root}", "trainer.max_epochs=1",
                       "data.limit_train=2000", f"trainer.accelerator={accelerator}", "~logger",
                       "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            runs.append({key: value for key, value in metrics.items() if key.startswith("perf/startup")})
    phases = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    import_seconds = statistics.median(imports)
    ratios = [run["perf/startup_seconds"] / seconds for run, seconds in zip(runs, imports, strict=True)]
    return {"import_torch_lightning_seconds": import_seconds, "imports": imports, "phases": phases, "runs": runs,
            "ratio_first_step_vs_imports": statistics.median(ratios)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(str(Path(args.root).resolve()), args.device, args.repeats)
    for key, value in result["phases"].items():
        print(f"{key:<40}{value:8.2f} s")
    print(f"{'import torch, lightning':<40}{result['import_torch_lightning_seconds']:8.2f} s")
    print(f"first step / imports: {result['ratio_first_step_vs_imports']:.2f} (median of {args.repeats}; goal <= 1.25)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
