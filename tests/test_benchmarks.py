"""The benchmarks (``python -m benchmarks <subcommand>``) run as their docstrings say, on CPU, and report figures
from real runs.

Timings are not asserted (they belong to the benchmarks, not to tests); what is checked is that each
benchmark measures what it claims: every arm ran, the figures are those of the runs' metrics.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from benchmarks import channel_graph as bench_channel_graph
from benchmarks import common as bench_common
from benchmarks import gpu as bench_gpu
from benchmarks import main as benchmarks_main
from benchmarks import overhead as bench_overhead
from benchmarks import time_to_accuracy as bench_time_to_accuracy


def run_script(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks <name> <args>`` from the repository root, as the docstrings say."""
    result = subprocess.run([sys.executable, "-m", "benchmarks", name, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_eager_and_compiled(tmp_path: Path, shared_data: Path) -> None:
    report = tmp_path / "gpu.json"
    result = run_script(
        "gpu", "--device", "cpu", "--quick", "--root", str(shared_data), "--studies", "mnist",
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
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "overhead", "--root", str(shared_data), "--repeats", "1",
         "--json", str(report)], cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    figures = json.loads(report.read_text())
    # A ratio above 1.05 is reported as "arms not equivalent" and fails the script; anything else passes.
    assert result.returncode == (1 if figures["ratio"] > 1.05 else 0), result.stderr[-3000:]
    assert set(figures["runs"]) == {"pruneflow", "bare_loop"}
    (pruneflow,), (bare,) = figures["runs"]["pruneflow"], figures["runs"]["bare_loop"]
    assert pruneflow["samples"] == bare["samples"] > 0  # the same work timed in both arms
    assert figures["ratio"] == pytest.approx(figures["medians"]["pruneflow"] / figures["medians"]["bare_loop"])
    assert figures["verdict"] == bench_overhead.verdict(figures["ratio"])


def test_an_arm_that_did_not_do_what_it_claims_is_refused_before_its_speed_counts() -> None:
    good = {"test/loss": 0.1, "mask/pruned_channels": {"features.0": 12}, "perf/train_samples_per_s": 900.0}
    bench_common.check_arm("ok", good, pruned=True, figures=("perf/train_samples_per_s",))
    bench_common.check_arm("unpruned", {"test/loss": 0.1}, pruned=False)
    cases = [
        (good | {"test/loss": math.nan}, True, (), "test loss is nan"),
        (good | {"mask/pruned_channels": {"features.0": 0}}, True, (), "claims to prune but pruned no channel"),
        (good, False, (), "claims not to prune but pruned 12 channels"),
        (good | {"perf/train_samples_per_s": None}, True, ("perf/train_samples_per_s",), "reported no perf/"),
    ]
    for metrics, pruned, figures, message in cases:
        with pytest.raises(bench_common.ArmError, match=message):
            bench_common.check_arm("arm", metrics, pruned=pruned, figures=figures)


def test_overhead_arms_must_time_the_same_samples_and_a_gain_is_not_equivalence() -> None:
    pruneflow = {"seconds": 10.0, "samples": 6400, "loss": 0.1}
    bench_overhead.check_equivalent(pruneflow, {"seconds": 9.0, "samples": 6400, "loss": 0.2})
    with pytest.raises(bench_common.ArmError, match="different work: pruneflow 6400 samples, bare loop 6272"):
        bench_overhead.check_equivalent(pruneflow, {"seconds": 9.0, "samples": 6272, "loss": 0.2})
    with pytest.raises(bench_common.ArmError, match="bare_loop: final training loss is nan"):
        bench_overhead.check_equivalent(pruneflow, {"seconds": 9.0, "samples": 6400, "loss": math.nan})
    assert bench_overhead.verdict(1.0) == "ok"
    assert bench_overhead.verdict(0.9).startswith("below target")
    assert bench_overhead.verdict(1.06).startswith("arms not equivalent")


def test_a_target_never_reached_is_a_failure_naming_the_runs() -> None:
    run = {"seconds_to_target": 20.0, "seconds_to_stay": 25.0, "test_acc": 0.992}
    missed = {"seconds_to_target": None, "seconds_to_stay": None, "test_acc": 0.987}
    assert bench_time_to_accuracy.unreached({"mnist": {"target": 0.99, "runs": [run, run]}}) == []
    assert bench_time_to_accuracy.unreached({"mnist": {"target": 0.99, "runs": [run, missed]}}) == [
        "mnist: repeats [1] never reached 99.0% (final test acc 0.9870)"
    ]


def test_gpu_benchmark_rows_are_medians_over_repeats_per_arm() -> None:
    def run(strategy: str, compiled: bool, speed: float, seconds: float | None) -> dict:
        return {"strategy": strategy, "compiled": compiled, "samples_per_s": speed, "seconds_to_target": seconds,
                "test_acc": 0.99, "fit_seconds": 10.0}  # fmt: skip

    runs = [
        run("disabled", False, 100, 5), run("activation", True, 300, 9), run("activation", True, 200, None),
        run("disabled", False, 120, 7), run("disabled", False, 110, 6), run("activation", True, 250, 8),
    ]  # fmt: skip
    rows = bench_gpu.median_rows(runs)
    assert [(row["strategy"], row["compiled"], row["repeats"]) for row in rows] == [
        ("disabled", False, 3), ("activation", True, 3),
    ]  # fmt: skip
    assert rows[0]["samples_per_s"] == 110 and rows[0]["seconds_to_target"] == 6
    assert rows[1]["samples_per_s"] == 250 and rows[1]["seconds_to_target"] is None  # one repeat never got there


def test_unknown_arms_are_one_line_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--device", "cpu",
                             "--strategies", "activation,magic"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "benchmarks gpu: error: unknown strategy 'magic'; choose from disabled, control, weight, activation, gradient, "
        "parametrize, hard"
    )


def test_channel_graph_benchmark_measures_pruneflows_cifar_resnet_with_its_coupled_groups() -> None:
    (row,) = benchmarks_main(["channel-graph", "--models", "cifar_resnet8", "--batch-sizes", "2", "--rounds", "1"])
    # ResNet-8: three coupled groups (the stem with stage 1's residual space, stages 2 and 3), each block's
    # conv1 free, and the logits (not prunable).
    assert (row["spaces"], row["prunable"], row["coupled"]) == (7, 6, 3)
    assert row["agreement"] == 1.0 and row["max_abs_diff"] <= 1e-4
    assert 3.0 < row["flops_ratio"] < 4.5 and row["params_after"] < row["params_before"] / 3
    assert row["speedup_b2"] > 0


def test_a_model_whose_process_dies_is_an_error_row_not_a_wait_for_the_time_limit() -> None:
    from dying import die

    row = bench_channel_graph.isolated(die, "resnet18", 64, limit=3600)  # a Pool waited out the whole hour
    assert row == {"handled": "error", "reason": "the process died (exit code 3)"}


def test_channel_graph_merge_keeps_the_lists_order_and_a_models_latest_row(tmp_path: Path) -> None:

    def row(model: str, flops_ratio: float, tp_flops_ratio: float) -> dict[str, object]:
        return {"model": model, "size": 64, "handled": "yes", "spaces": 2, "prunable": 1, "coupled": 0,
                "channels_cut": 0.5, "agreement": 1.0, "max_rel_diff": 0.0, "flops_ratio": flops_ratio,
                "params_ratio": 3.9, "tp_handled": "yes", "tp_flops_ratio": tp_flops_ratio}  # fmt: skip

    first, rerun, merged = tmp_path / "first.json", tmp_path / "rerun.json", tmp_path / "merged.json"
    first.write_text(json.dumps({"rows": [row("vgg11", 3.96, 3.96), row("alexnet", 1.9, 3.79)]}))
    rerun.write_text(json.dumps({"rows": [row("alexnet", 3.79, 3.79)]}))  # measured again after a change
    rows = benchmarks_main(["channel-graph", "--merge", str(first), str(rerun), "--json", str(merged)])
    assert [(r["model"], r["flops_ratio"]) for r in rows] == [("alexnet", 3.79), ("vgg11", 3.96)]  # the list's order
    summary = json.loads(merged.read_text())["summary"]
    assert summary["models"] == 2 and summary["pruneflow_at_least_0.95_tp"] == 2


def test_step_profile_reports_the_ops_of_the_window_it_names() -> None:
    import lightning as L
    from test_strategies import OPTIMIZERS, TinyNet, toy_loader

    from benchmarks.step_profile import StepProfile
    from pruneflow import ClassifierModule

    step_profile = StepProfile(start=2, steps=3, rows=100)
    trainer = L.Trainer(max_steps=8, callbacks=[step_profile], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(ClassifierModule(TinyNet("relu"), OPTIMIZERS["sgd"], num_classes=3), train_dataloaders=toy_loader())
    lines = step_profile.report.splitlines()
    assert lines[0].startswith("steps 2-5: ") and lines[0].endswith(" ms a step (wall)")
    convolutions = [line for line in lines if line.startswith("| aten::convolution_backward |")]
    assert len(convolutions) == 1 and convolutions[0].endswith("| 2 |")  # two convs, each once a step
    assert step_profile.profiler is None  # stopped after its window


# One model of each family of Torch-Pruning's torchvision list that the channel graph handles quickly at
# 64 px, with Torch-Pruning 1.6.1's FLOPs ratio on the same freshly seeded model (50 % L1 of every group,
# measured by python -m benchmarks channel-graph --models torch_pruning_list, README's table; CI has no torch_pruning).
TORCH_PRUNING_FLOPS_RATIO = {
    "resnet18": 3.76, "densenet121": 3.84, "efficientnet_b0": 3.58, "regnet_y_400mf": 3.90,
    "resnext50_32x4d": 3.89, "mobilenet_v3_small": 3.35, "squeezenet1_1": 3.64, "mnasnet0_5": 3.32,
    "googlenet": 3.71, "convnext_tiny": 3.90,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCH_PRUNING_FLOPS_RATIO)
def test_channel_graph_prunes_every_family_of_torch_prunings_list_as_far_as_torch_pruning(name: str) -> None:
    row = bench_channel_graph.measure(name, bench_channel_graph.list_size(name))
    assert row["handled"] == "yes" and row["size"] == 64
    assert row["agreement"] == 1.0 and row["max_rel_diff"] <= 1e-5  # the cut model computes the masked one
    assert row["channels_cut"] >= 0.45  # of every channel, the logits' included: only those are kept whole
    assert row["flops_ratio"] >= 0.95 * TORCH_PRUNING_FLOPS_RATIO[name]


@pytest.mark.slow
def test_torch_prunings_figure_is_measured_on_the_same_model() -> None:
    pytest.importorskip("torch_pruning", reason="Torch-Pruning is an optional dependency of the script only")
    row = bench_channel_graph.measure_torch_pruning("resnet18", 64)
    assert row["tp_handled"] == "yes" and row["tp_flops_ratio"] == pytest.approx(3.76, abs=0.01)


def test_the_zoo_list_and_its_summary() -> None:
    names = bench_channel_graph.TORCH_PRUNING_LIST
    assert len(set(names)) == len(names) == 69
    assert [bench_channel_graph.list_size(name) for name in ("resnet18", "vit_b_16", "swin_t", "maxvit_t")] == [
        64, 224, 224, 224,
    ]  # fmt: skip
    rows = [
        {"model": "a", "handled": "yes", "flops_ratio": 3.8, "tp_handled": "yes", "tp_flops_ratio": 3.8},
        {"model": "b", "handled": "yes", "flops_ratio": 2.0, "tp_handled": "yes", "tp_flops_ratio": 3.0},
        {"model": "c", "handled": "yes", "flops_ratio": 1.7, "tp_handled": "error", "tp_reason": "RuntimeError: x"},
        {"model": "d", "handled": "timeout", "reason": "over 9 s", "tp_handled": "yes", "tp_flops_ratio": 3.0},
    ]
    assert bench_channel_graph.summary(rows) == {
        "models": 4, "handled_pruneflow": 3, "handled_torch_pruning": 3, "handled_both": 2,
        "median_flops_ratio_pruneflow": 2.9, "median_flops_ratio_torch_pruning": 3.4, "pruneflow_at_least_0.95_tp": 1,
    }  # fmt: skip
    errors = rows[2] | {"model": "e", "size": 64, "handled": "error", "reason": "ValueError: y | z"}
    line = bench_channel_graph.table_line(errors, (), compare=True)
    assert line.startswith("| e | 64 | error: ValueError: y \\| z | – |")  # a reason's "|" does not split the row
    assert line.endswith("| error: RuntimeError: x | – |")
