"""``python -m benchmarks outcome``: both arms reach 2.0× fewer FLOPs as measured on the cut networks, the table
reports them, and the learning-rate phases and bad flags behave as its docstring says.

The end-to-end run is a smoke preset on CIFAR-shaped synthetic tensors (its accuracies mean nothing; the real
comparison is the benchmark's to run, not a test's)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import main as benchmarks_main
from benchmarks import outcome


@pytest.mark.slow
def test_both_arms_are_cut_to_the_flops_target_and_reported_in_the_table() -> None:
    pytest.importorskip("torch_pruning")
    report = benchmarks_main([
        "outcome", "--data", "synthetic", "--pretrain-epochs", "1", "--sparse-epochs", "1", "--finetune-epochs", "1",
        "--seeds", "0", "--limit-batches", "2", "--batch-size", "32",
    ])  # fmt: skip
    (row,) = report["rows"]
    assert row["pruneflow"]["flops_ratio"] == pytest.approx(outcome.SPEED_UP, rel=0.02)
    # Torch-Pruning stops at the first of its steps past the target by its own counter; ours must agree with it
    assert row["torch-pruning"]["flops_ratio"] == pytest.approx(row["torch-pruning"]["speed_up_by_its_counter"],
                                                                rel=0.02)  # fmt: skip
    assert row["torch-pruning"]["flops_ratio"] == pytest.approx(outcome.SPEED_UP, rel=0.02)
    for arm in ("dense", *outcome.ARMS):
        assert 0.0 <= row[arm]["test_acc"] <= 1.0
    assert row["dense"]["flops"] == pytest.approx(row["pruneflow"]["flops"] * row["pruneflow"]["flops_ratio"])
    table = {line.split("|")[1].strip(): line for line in report["markdown"].splitlines()[2:]}
    assert set(table) == {"dense", *outcome.ARMS}
    for arm in outcome.ARMS:
        assert f"{report['summary'][arm]['flops_ratio']:.3f}x" in table[arm]
        assert f"{row[arm]['params']:,}" in table[arm]


def test_each_phase_restarts_the_learning_rate_and_decays_at_its_milestones() -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    # 10 + 5 epochs of 10 steps: ×0.1 at epochs 6, 8 of the first phase, then at 10 + 3, 10 + 4
    scheduler = outcome.phased_multistep([(10, (0.6, 0.8)), (5, (0.6, 0.8))])(optimizer, total_steps=150)
    factor = scheduler.lr_lambdas[0]
    factors = [factor(step) for step in (0, 59, 60, 80, 99, 100, 129, 130, 140, 149)]
    assert factors == pytest.approx([1, 1, 0.1, 0.01, 0.01, 1, 1, 0.1, 0.01, 0.01], rel=1e-9)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--seeds", "0,x"], "--seeds='0,x'"), (["--finetune-epochs", "0"], "--finetune-epochs=0: must be an int >= 1")],
)
def test_bad_flags_are_refused_in_one_line_before_anything_trains(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        benchmarks_main(["outcome", "--data", "synthetic", *flags])


def test_every_fit_trains_in_train_mode_whatever_mode_the_network_was_left_in() -> None:
    """Torch-Pruning's tracing and counting leave the network in eval mode; its BatchNorm must still train as such."""
    import argparse

    import lightning as L

    from pruneflow import ClassifierModule

    modes: list[bool] = []

    class RecordMode(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: object) -> None:
            modes.append(all(module.training for module in pl_module.model.modules()))

    args = argparse.Namespace(data="synthetic", batch_size=16, device="cpu", limit_batches=1)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(10)).eval()  # fmt: skip
    network(torch.zeros(1, 3, 32, 32))
    module = ClassifierModule(network, optimizer=outcome.sgd(0.01), num_classes=10)
    outcome.fit(args, module, outcome.make_data(args, seed=0), 1, [RecordMode()])
    assert modes == [True]


def test_resume_keeps_the_seeds_the_report_holds_and_refuses_a_report_of_other_settings(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torch_pruning")
    measured_seeds = []

    def fake_seed(args, seed: int, epochs: dict[str, int]) -> dict:
        measured_seeds.append(seed)
        return {"seed": seed, **{arm: {"test_acc": 0.5, "flops": 2, "params": 2, "flops_ratio": 2.0}
                                 for arm in ("dense", *outcome.ARMS)}}  # fmt: skip

    monkeypatch.setattr(outcome, "run_seed", fake_seed)
    report = tmp_path / "outcome.json"
    flags = ["outcome", "--data", "synthetic", "--json", str(report), "--pretrain-epochs", "1"]
    benchmarks_main([*flags, "--seeds", "0"])
    assert measured_seeds == [0] and json.loads(report.read_text())["seeds"] == [0]
    benchmarks_main([*flags, "--seeds", "0,1", "--resume"])
    assert measured_seeds == [0, 1] and json.loads(report.read_text())["seeds"] == [0, 1]
    with pytest.raises(SystemExit, match="measured with other settings"):
        benchmarks_main(["outcome", "--data", "synthetic", "--json", str(report), "--seeds", "0", "--resume"])
