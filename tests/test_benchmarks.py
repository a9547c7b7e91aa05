"""The benchmark scripts run as their docstrings say, on CPU, and report figures from real runs.

Timings are not asserted (they belong to the benchmarks, not to tests); what is checked is that each
script measures what it claims: every arm ran, the figures are those of the runs' metrics.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_eager_and_compiled(tmp_path: Path, shared_data: Path) -> None:
    report = tmp_path / "gpu.json"
    result = run_script(
        "bench_gpu.py", "--device", "cpu", "--quick", "--root", str(shared_data), "--studies", "mnist",
        "--strategies", "disabled,activation", "--json", str(report),
    )  # fmt: skip
    rows = json.loads(report.read_text())["rows"]
    assert [(row["strategy"], row["compiled"]) for row in rows] == [
        ("disabled", False), ("activation", False), ("disabled", True), ("activation", True),
    ]  # fmt: skip
    for row in rows:
        assert row["samples_per_s"] > 0 and 0.9 < row["test_acc"] <= 1.0, row
        assert row["curve"][-1]["acc"] == pytest.approx(row["test_acc"], abs=1e-4)
        assert "compile=true" in row["overrides"] if row["compiled"] else "compile=false" in row["overrides"]
    assert "vs eager, no mask" in result.stdout and "activation   compiled" in result.stdout


@pytest.mark.slow
def test_overhead_benchmark_compares_train_py_with_the_bare_loop(tmp_path: Path, shared_data: Path) -> None:
    report = tmp_path / "overhead.json"
    run_script("bench_overhead.py", "--root", str(shared_data), "--repeats", "1", "--json", str(report))
    figures = json.loads(report.read_text())
    assert set(figures["runs"]) == {"pruneflow", "bare_loop"}
    assert all(len(values) == 1 and values[0] > 0 for values in figures["runs"].values())
    assert figures["ratio"] == pytest.approx(figures["medians"]["pruneflow"] / figures["medians"]["bare_loop"])


def test_unknown_arms_are_one_line_errors() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--device", "cpu",
                             "--strategies", "activation,magic"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "bench_gpu.py: error: unknown strategy 'magic'; choose from disabled, control, weight, activation, gradient, "
        "parametrize, hard"
    )
