"""The findings report's comparison with what has been published about masked weights coming back: each claim
with its source, checked on every network of the sweeps (the runs' own metrics), and said where a network agrees,
where it differs, and where the sweeps have no runs to tell.

The claims are those the field repeats without figures: momentum revives weights whose gradient is masked
(FPGM's issue tracker, a Deep Compression reimplementation), not when they are masked before training
(FPGM's author), re-zeroing after every mini-batch keeps them at zero (Distiller), and soft filter pruning's
zeroed filters are updated and regrow by design (He et al., IJCAI 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from pruneflow.experiment.report_cells import fmt, values
from pruneflow.experiment.trap_findings import RunLike, by_family

AT_INITIALISATION = "at initialisation"
DRIFT = "drift/producer_l2/final"
LEAK = "leak/eval_activation_abs_mean/final"


class PublishedClaim(NamedTuple):
    """A published claim, where it was made, and how to check it on one network's runs: ``check`` returns
    (True: agrees, False: differs, None: no runs to tell; the evidence in words)."""

    text: str
    source: str
    check: Callable[[Sequence[RunLike]], tuple[bool | None, str]]


def _pruned(runs: Sequence[RunLike], label: str, initial: bool, optimizer: str | None = None) -> list[RunLike]:
    """``label``'s runs pruned at initialisation (``initial``) or after pre-training; one optimizer or all."""
    return [r for r in runs if r.label == label and (r.timing == AT_INITIALISATION) == initial
            and (optimizer is None or r.optimizer == optimizer)]  # fmt: skip


def _momentum_revives_gradient_masked_weights(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    members = _pruned(runs, "gradient", initial=False, optimizer="SGD")
    drift = values(members, DRIFT)
    if not drift:
        return None, ""
    momentum = values(members, "optim/pruned_momentum_l2/max")
    evidence = f"`gradient`, SGD, after pre-training: L2 {fmt(drift)}, {len(drift)} runs"
    return min(drift) > 0, evidence + (f", momentum up to {fmt(momentum)}" if momentum else "")


def _no_revival_when_masked_before_training(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    drift = values(_pruned(runs, "gradient", initial=True), DRIFT)
    if not drift:
        return None, ""
    return max(drift) == 0, f"`gradient` at initialisation, every optimizer: L2 {fmt(drift)}, {len(drift)} runs"


def _rezeroing_each_step_holds(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    members = [r for r in runs if r.label == "hard"]
    at_zero = values(members, "drift/zero_fraction/final")
    if not at_zero:
        return None, ""
    leak = values(members, LEAK)
    evidence = f"`hard`: fraction of pruned kernels at zero {fmt(at_zero)}, {len(at_zero)} runs"
    if leak and max(leak) > 0:
        evidence += f"; yet the channels leak {fmt(leak)} (mean \\|activation\\|, eval)"
        evidence += ": a zero kernel is not a zero channel"
    return min(at_zero) == 1, evidence


def _zeroed_filters_regrow(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    after, initial = (values(_pruned(runs, "weight", initial=flag), DRIFT) for flag in (False, True))
    if not after:
        return None, ""
    evidence = f"`weight` after pre-training: L2 {fmt(after)}, {len(after)} runs"
    if initial:
        held = sum(value == 0 for value in initial)
        evidence += f"; at initialisation L2 {fmt(initial)}" + (
            f" ({held} of {len(initial)} runs held at exactly 0: a ReLU after a BatchNorm whose β is still 0 passes "
            "no gradient to an all-zero channel)" if held else ""
        )
    return min(after) > 0, evidence


PUBLISHED_CLAIMS = (
    PublishedClaim(
        "Masking a pruned weight's gradient does not keep it at zero: SGD's momentum revives it",
        "[FPGM issue #47](https://github.com/he-y/filter-pruning-geometric-median/issues/47), "
        "[PyTorch-Deep-Compression issue #2](https://github.com/ruihangdu/PyTorch-Deep-Compression/issues/2)",
        _momentum_revives_gradient_masked_weights,
    ),
    PublishedClaim(
        "Masked before training, the gradient mask keeps them at zero: there is no momentum yet to revive them",
        "the FPGM author's reply in [issue #47](https://github.com/he-y/filter-pruning-geometric-median/issues/47)",
        _no_revival_when_masked_before_training,
    ),
    PublishedClaim(
        "Re-applying the mask to the weights after every mini-batch keeps them at zero whatever the momentum",
        "[Distiller pull request #63](https://github.com/IntelLabs/distiller/pull/63)",
        _rezeroing_each_step_holds,
    ),
    PublishedClaim(
        "Soft filter pruning: filters zeroed once keep being updated and regrow (on purpose, to keep the capacity)",
        "He et al., Soft Filter Pruning, IJCAI 2018, [arXiv:1808.06866](https://arxiv.org/abs/1808.06866); "
        "[FPGM issue #9](https://github.com/he-y/filter-pruning-geometric-median/issues/9)",
        _zeroed_filters_regrow,
    ),
)


def published_comparison(runs: Sequence[RunLike]) -> list[str]:
    """One line per published claim with runs to check it: its source, the networks that agree, those that
    differ (with the evidence of each)."""
    lines = []
    for claim in PUBLISHED_CLAIMS:
        agree, differ = by_family(claim.check, runs)
        if not agree and not differ:
            continue
        line = f"*{claim.text}* — {claim.source}. Agrees: " + ("; ".join(agree) if agree else "no network") + "."
        if differ:
            line += " **Differs:** " + "; ".join(differ) + "."
        lines.append(line)
    return lines
