"""The GPU suite's pieces that need no GPU: the CUDA thresholds it suggests from the ladder, and the README
section it renders — every section, a failed one saying why (the whole suite ran on CPU with ``--tiny``)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import gpu_section as render_gpu_section
from benchmarks import gpu_suite
from benchmarks import main as benchmarks_main


def ladder_row(model: str, gflops: float, bf16_cl: float) -> dict[str, object]:
    speedup = {"fp32/nchw": 1.0, "fp32/cl": 1.0, "bf16/nchw": 1.0, "bf16/cl": bf16_cl}
    return {"model": model, "batch": 128, "gflops_per_batch": gflops, "speedup": speedup, "auto": "fp32/nchw",
            "best": "bf16/cl", "auto_slower": False}  # fmt: skip


def test_suggested_threshold_is_where_bf16_channels_last_starts_to_win_for_good() -> None:
    rows = [ladder_row("tiny", 0.01, 0.6), ladder_row("mnist", 1.1, 1.2), ladder_row("vgg", 8.7, 0.98),
            ladder_row("resnet56", 32, 1.4), ladder_row("vgg11", 39, 1.9)]  # fmt: skip
    assert gpu_suite.suggest_thresholds(rows) == {"bf16_from_gflops": 32, "channels_last_from_gflops": 32}
    assert gpu_suite.suggest_thresholds(rows[:3]) == {"bf16_from_gflops": None, "channels_last_from_gflops": None}


def test_the_readme_section_renders_every_section_and_replaces_only_between_the_markers(tmp_path: Path) -> None:
    report = {
        "device": "NVIDIA H200", "versions": {"torch": "2.11", "lightning": "2.6.6"}, "seconds": 431.0, "tiny": False,
        "sections": {
            "sync": {"activation": {"steps": 16, "host_reads": 0, "ops": {}},
                     "weight": {"error": "Traceback\nRuntimeError: called a synchronizing CUDA operation"}},
            "overhead": {"fp32_nchw": {"ratio_median": 0.97}, "bf16_channels_last": {"ratio_median": 0.99}},
            "host": {"ratio_pruneflow_vs_lightning": 1.03, "median_ms": {"pruneflow": 3.1, "lightning": 3.0}},
            "compile": {"error": "Traceback\nRuntimeError: boom"},
            "cut": {"vgg11": {"speedup": 2.9, "cut": {"flops_ratio": 3.95}}},
        },
    }  # fmt: skip
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(report))
    section = render_gpu_section.render(report)
    assert "none in 1 of 2 strategies; reads in weight (RuntimeError: called a synchronizing CUDA operation)" in section
    assert "fp32 nchw: **0.97×**" in section and "**1.03×**" in section and "failed: RuntimeError: boom" in section
    assert "vgg11 **×2.9** (FLOPs ×3.95)" in section and "start-up | not run" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{render_gpu_section.BEGIN}\nold figures\n{render_gpu_section.END}\nafter\n")
    benchmarks_main(["gpu-section", str(path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old figures" not in text
    assert section in text
