"""The findings report's comparison with published claims: each claim with its source, where a network's runs
agree, where they differ, and nothing said where no run can tell."""

from __future__ import annotations

from pruneflow.experiment import report
from pruneflow.experiment.published_claims import PUBLISHED_CLAIMS, published_comparison


def run(data: str, label: str, optimizer: str, timing: str, **metrics: float) -> report.Run:
    return report.Run(f"{data},{label},{optimizer},{timing}", data, optimizer, "relu", timing, label, 0, metrics)


AFTER, INITIAL = "after 1 epoch", "at initialisation"


def test_momentum_reviving_gradient_masked_weights_agrees_where_they_drift_and_differs_where_they_do_not() -> None:
    runs = [
        run("CIFAR10 / ResNet", "gradient", "SGD", AFTER, **{"drift/producer_l2/final": 0.2,
                                                             "optim/pruned_momentum_l2/max": 1.5}),
        run("CIFAR10 / ViT", "gradient", "SGD", AFTER, **{"drift/producer_l2/final": 0.0}),
        run("CIFAR10 / ViT", "gradient", "AdamW", AFTER, **{"drift/producer_l2/final": 0.3}),  # not SGD: not read
    ]  # fmt: skip
    line = next(line for line in published_comparison(runs) if "momentum revives it" in line)
    assert "filter-pruning-geometric-median/issues/47" in line
    assert "Agrees: CIFAR10 / ResNet (`gradient`, SGD, after pre-training: L2 0.2, 1 runs, momentum up to 1.5)" in line
    assert "**Differs:** CIFAR10 / ViT (`gradient`, SGD, after pre-training: L2 0, 1 runs)" in line


def test_soft_filter_pruning_regrowth_names_the_runs_held_at_zero_at_initialisation() -> None:
    runs = [
        run("FashionMNIST / ConvNet", "weight", "SGD", AFTER, **{"drift/producer_l2/final": 13.0}),
        run("FashionMNIST / ConvNet", "weight", "SGD", INITIAL, **{"drift/producer_l2/final": 0.0}),
        run("FashionMNIST / ConvNet", "weight", "Adam", INITIAL, **{"drift/producer_l2/final": 0.06}),
    ]
    line = next(line for line in published_comparison(runs) if "Soft filter pruning" in line)
    assert "arXiv:1808.06866" in line and "**Differs:**" not in line
    assert "after pre-training: L2 13, 1 runs" in line and "1 of 2 runs held at exactly 0" in line


def test_rezeroing_after_every_step_holds_the_kernels_while_the_channel_still_leaks() -> None:
    runs = [run("CIFAR10 / VGG", "hard", "SGD", AFTER, **{"drift/zero_fraction/final": 1.0,
                                                          "leak/eval_activation_abs_mean/final": 0.008})]  # fmt: skip
    line = next(line for line in published_comparison(runs) if "after every mini-batch" in line)
    assert "distiller/pull/63" in line and "Agrees: CIFAR10 / VGG (`hard`: fraction of pruned kernels at zero 1" in line
    assert "the channels leak 0.008" in line


def test_a_claim_no_run_can_check_is_left_out() -> None:
    runs = [run("CIFAR10 / VGG", "activation", "SGD", AFTER, **{"drift/producer_l2/final": 0.0})]
    assert published_comparison(runs) == []
    assert all(claim.source for claim in PUBLISHED_CLAIMS)
