"""The findings report's reading of the trap probe (``traps``) across network families: the trap columns of the
tables, a one-line cause per cell, a sentence per family and strategy on each trap it has, and the findings of the
ConvNet/VGG report checked on every family — stated once, with each family's evidence, and where a family
contradicts one, said so (where the ``activation`` mask's guarantee fails, that is a defect of the mask).

A run's trap readings enter its metrics as ``trap/<key>`` (``with_traps``); a family is a section of the report
(its data set and model: ``Run.data``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from math import prod
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from omegaconf import OmegaConf

from pruneflow.errors import ConfigError
from pruneflow.experiment.report_cells import fmt, values
from pruneflow.experiment.traps import TRAPS_FILE, cached_traps

log = logging.getLogger(__name__)

PREFIX = "trap/"
# (metrics key, column title) of the trap columns, eval mode (train mode is in traps.json): empty ones are left out.
TRAP_COLUMNS = (
    ("trap/residual/skip_pruned_abs_mean/eval", "skip at pruned"),
    ("trap/residual/skip_kept_abs_mean/eval", "skip at kept"),
    ("trap/residual/norm_pruned_abs_mean/eval", "stream BN at pruned"),
    ("trap/se/gate_pruned_mean/eval", "SE gate at pruned"),
    ("trap/se/product_pruned_abs_mean/eval", "SE product at pruned"),
    ("trap/layernorm/output_pruned_abs_mean/eval", "LN out at pruned"),
    ("trap/layernorm/mean_shift/eval", "LN mean shift"),
    ("trap/layer_scale/pruned_abs_mean", "layer scale at pruned"),
    ("trap/heads/read_pruned_abs_mean/eval", "heads at pruned"),
    ("trap/reader/pruned_abs_max/eval", "reader max at pruned"),
    ("trap/guarantee/grad_pruned_abs_max", "grad max at pruned"),
)
# Where a pruned channel is written again, in the words of a cause: (what, at pruned channels, at kept ones).
LEAKS = (
    ("the skip path", "trap/residual/skip_pruned_abs_mean/eval", "trap/residual/skip_kept_abs_mean/eval"),
    ("the stream's BatchNorms (β)", "trap/residual/norm_pruned_abs_mean/eval", None),
    ("the SE product", "trap/se/product_pruned_abs_mean/eval", "trap/se/product_kept_abs_mean/eval"),
    ("the LayerNorm's output (β)", "trap/layernorm/output_pruned_abs_mean/eval",
     "trap/layernorm/output_kept_abs_mean/eval"),
    ("the attention heads", "trap/heads/read_pruned_abs_mean/eval", "trap/heads/read_kept_abs_mean/eval"),
    ("the next layer's input", "trap/plain/read_pruned_abs_mean/eval", "trap/plain/read_kept_abs_mean/eval"),
)  # fmt: skip
GUARANTEE_KEYS = ("trap/reader/pruned_abs_max/eval", "trap/reader/pruned_abs_max/train",
                  "trap/guarantee/grad_pruned_abs_max", "leak/activation_abs_mean/max",
                  "leak/eval_activation_abs_mean/max")  # fmt: skip
# A cut that changes nothing moves test accuracy by no more than this (a handful of test images' ties).
NO_GAP = 0.005


class RunLike(Protocol):
    """What these readers take of ``report.Run``."""

    name: str
    data: str
    optimizer: str
    timing: str
    label: str
    metrics: dict


def mean(runs: Sequence[RunLike], key: str) -> str:
    return fmt(values(runs, key))


# -- reading the probe into runs -------------------------------------------------------------------------
def with_traps(root: Path, name: str, metrics: dict[str, Any], failures: dict[str, str]) -> dict[str, Any]:
    """``metrics`` with the run's trap readings as ``trap/<key>`` (``<run>/traps.json``, measured and written
    there the first time). A run the probe cannot rebuild (no checkpoint, no masks) gets none and its reason goes
    into ``failures``."""
    run = root / name
    if not (run / "checkpoints" / "last.ckpt").is_file() and not (run / TRAPS_FILE).is_file():
        failures[name] = "no checkpoints/last.ckpt"
        return metrics
    try:
        readings = cached_traps(run)
    except ConfigError as exc:  # a committed report names no folder of the machine it was made on
        failures[name] = str(exc).splitlines()[0].replace(str(run), "the run folder")
        return metrics
    return {**metrics, **{PREFIX + key: value for key, value in readings.items()}}


def grid_size(sweep: Path) -> int | None:
    """Runs the sweep's grid asks for (the product of its sweeper's value lists, from ``multirun.yaml``)."""
    multirun = sweep / "multirun.yaml"
    if not multirun.is_file():
        return None
    params = OmegaConf.select(OmegaConf.load(multirun), "hydra.sweeper.params") or {}
    return prod(len(str(value).split(",")) for value in params.values()) if params else None


# -- a cause per table cell ------------------------------------------------------------------------------
def cell_cause(runs: Sequence[RunLike]) -> str:
    """Why the cell's pruned channels are, or are not, gone: one line from the trap readings and the drift."""
    drift = values(runs, "drift/producer_l2/final")
    drifting = bool(drift) and max(drift) > 0
    guarded = [value for key in GUARANTEE_KEYS[:3] for value in values(runs, key)]
    if not guarded:
        return ""
    if max(guarded) == 0:
        moved = (f"kernels drifted to L2 {fmt(drift)} (optimizer state), " if drifting
                 else "kernels stay at 0, ")  # fmt: skip
        return moved + "but every reader gets exactly 0 and the producers exactly 0 gradient"
    found = []  # (what, at pruned channels, share of kept) in LEAKS' order: the family's own traps first
    for what, pruned_key, kept_key in LEAKS:
        pruned = values(runs, pruned_key)
        if pruned and statistics.fmean(pruned) > 0:
            kept = statistics.fmean(values(runs, kept_key) or [0.0]) if kept_key else 0.0
            found.append((what, statistics.fmean(pruned), statistics.fmean(pruned) / kept if kept > 0 else None))
    if not found:
        return ""
    # The first trap carrying at least half the largest share of the kept channels' size (a share where known)
    largest = max((share for _, _, share in found if share is not None), default=None)
    what, size, share = next(item for item in found if largest is None or (item[2] or 0.0) >= largest / 2)
    cause = f"{what} carries {size:.3g} into the pruned channels" + (f" ({share:.0%} of kept)" if share else "")
    gate = values(runs, "trap/se/gate_pruned_mean/eval")
    if gate:
        cause += f"; SE gate {statistics.fmean(gate):.4g} there"
    return cause + (f"; kernels at L2 {fmt(drift)}" if drifting else "; kernels at 0")


# -- sentences per family ------------------------------------------------------------------------------
def _count(found: list[float]) -> str:
    """A count every run shares as the number, else as mean ± std."""
    return f"{found[0]:.0f}" if len(set(found)) == 1 else fmt(found)


def trap_sentences(runs: Sequence[RunLike], order: Callable[[str], Any]) -> list[str]:
    """Per family and strategy, one sentence on each trap the family has, with its numbers (mean ± std over runs,
    eval mode)."""
    sentences = []
    for data in sorted({r.data for r in runs}):
        family = [r for r in runs if r.data == data]
        if not values(family, "trap/traps/pruned_spaces"):
            continue
        kinds = [kind for kind in ("residual", "se", "heads", "plain")
                 if values(family, f"trap/{kind}/spaces")]  # fmt: skip
        spaces = ", ".join(f"{kind} {_count(values(family, f'trap/{kind}/spaces'))}" for kind in kinds)
        only_plain = kinds == ["plain"]
        sentences.append(f"{data}: pruned channel spaces by trap: {spaces}" + (
            "; no skip path, gate, LayerNorm or attention head reads a pruned channel (the channel graph prunes "
            "none of the spaces they read)" if only_plain else "") + ".")  # fmt: skip
        for label in sorted({r.label for r in family}, key=order):
            members = [r for r in family if r.label == label]
            parts = []
            if values(members, "trap/residual/skip_pruned_abs_mean/eval"):
                parts.append(
                    f"the skip path brings {mean(members, 'trap/residual/skip_pruned_abs_mean/eval')} into the pruned "
                    f"stream channels (kept: {mean(members, 'trap/residual/skip_kept_abs_mean/eval')})"
                    + (f", the stream's BatchNorms write {mean(members, 'trap/residual/norm_pruned_abs_mean/eval')} "
                       "there" if values(members, "trap/residual/norm_pruned_abs_mean/eval") else "")
                )  # fmt: skip
            if values(members, "trap/se/gate_pruned_mean/eval"):
                parts.append(
                    f"the SE gate is {mean(members, 'trap/se/gate_pruned_mean/eval')} at pruned channels (kept "
                    f"{mean(members, 'trap/se/gate_kept_mean/eval')}), multiplying "
                    f"{mean(members, 'trap/se/input_pruned_abs_mean/eval')} into a product of "
                    f"{mean(members, 'trap/se/product_pruned_abs_mean/eval')}"
                )
            if values(members, "trap/layernorm/output_pruned_abs_mean/eval"):
                parts.append(
                    "the LayerNorms read pruned channels of mean "
                    f"{mean(members, 'trap/layernorm/input_mean_pruned/eval')} and variance "
                    f"{mean(members, 'trap/layernorm/input_var_pruned/eval')} (kept: "
                    f"{mean(members, 'trap/layernorm/input_mean_kept/eval')}, "
                    f"{mean(members, 'trap/layernorm/input_var_kept/eval')}): counted, they move the mean by "
                    f"{mean(members, 'trap/layernorm/mean_shift/eval')} kept standard deviations and scale the "
                    f"variance by {mean(members, 'trap/layernorm/var_ratio/eval')}; the LayerNorms write "
                    f"{mean(members, 'trap/layernorm/output_pruned_abs_mean/eval')} into pruned channels (|β| there "
                    f"{mean(members, 'trap/layernorm/beta_pruned_abs_mean')})"
                )
            if values(members, "trap/layer_scale/pruned_abs_mean"):
                parts.append(
                    f"the layer scale is {mean(members, 'trap/layer_scale/pruned_abs_mean')} at pruned channels (kept "
                    f"{mean(members, 'trap/layer_scale/kept_abs_mean')})"
                )
            if values(members, "trap/heads/read_pruned_abs_mean/eval"):
                parts.append(f"the output projection reads {mean(members, 'trap/heads/read_pruned_abs_mean/eval')} "
                             "from pruned head rows")  # fmt: skip
            if parts:
                sentences.append(f"{data}, `{label}` ({len(members)} runs): " + "; ".join(parts) + ".")
    return sentences


# -- the ConvNet/VGG findings, checked per family -----------------------------------------------------------
class Claim(NamedTuple):
    """A finding of the ConvNet/VGG report and how to check it on one family's runs: ``check`` returns
    (True: holds, False: contradicted, None: no runs to tell; the evidence in words)."""

    text: str
    check: Callable[[Sequence[RunLike]], tuple[bool | None, str]]
    defect: bool = False  # contradicted, it is a defect of the mask, not a finding


def _of(runs: Sequence[RunLike], *labels: str) -> list[RunLike]:
    return [r for r in runs if r.label in labels]


def _activation_guarantee(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    members = _of(runs, "activation", "activation+reset")
    readings = {key: values(members, key) for key in GUARANTEE_KEYS}
    readings = {key: found for key, found in readings.items() if found}
    if not readings:
        return None, ""
    worst = {key: max(found) for key, found in readings.items()}
    words = ", ".join(f"{key.removeprefix(PREFIX)} max {value:.3g}" for key, value in worst.items())
    return max(worst.values()) == 0, f"{len(members)} runs: {words}"


def _held_at_zero(*labels: str) -> Callable[[Sequence[RunLike]], tuple[bool | None, str]]:
    def check(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
        members = _of(runs, *labels)
        fractions = values(members, "drift/zero_fraction/final")
        if not fractions:
            return None, ""
        return min(fractions) == 1, f"{len(members)} runs, fraction at zero {fmt(fractions)}"

    return check


def _weight_comes_back(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    members = [r for r in _of(runs, "weight") if r.timing != "at initialisation"]
    drift = values(members, "drift/producer_l2/final")
    if not drift:
        return None, ""
    return min(drift) > 0, f"{len(members)} runs, L2 {fmt(drift)}"


def _reset_holds_gradient_drifts(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    reset = values(_of(runs, "activation+reset"), "drift/producer_l2/max")
    gradient = values([r for r in _of(runs, "gradient") if r.timing != "at initialisation"], "drift/producer_l2/final")
    if not reset or not gradient:
        return None, ""
    return max(reset) == 0 and min(gradient) > 0, f"`gradient` L2 {fmt(gradient)}, `activation+reset` max {fmt(reset)}"


def _cut_exact_for_activation(runs: Sequence[RunLike]) -> tuple[bool | None, str]:
    gaps = values(_of(runs, "activation", "activation+reset"), "compact/acc_gap")
    control = values(_of(runs, "control"), "compact/acc_gap")
    if not gaps:
        return None, ""
    return max(abs(gap) for gap in gaps) <= NO_GAP, f"gap {fmt(gaps)} (`control` {fmt(control)})"


CLAIMS = (
    Claim("`activation` leaks nothing: every reader of a pruned channel gets exactly 0 (train and eval mode), its "
          "producers exactly 0 gradient", _activation_guarantee, defect=True),
    Claim("`parametrize` and `hard` keep every pruned kernel at exactly 0", _held_at_zero("parametrize", "hard")),
    Claim("pruned after pre-training, `weight`'s kernels come back", _weight_comes_back),
    Claim("`gradient` zeroes the gradient yet its kernels drift (the optimizer state from before pruning); with the "
          "state reset (`activation+reset`) they stay at 0", _reset_holds_gradient_drifts),
    Claim(f"cutting `activation`'s pruned channels out changes test accuracy by at most {NO_GAP}",
          _cut_exact_for_activation),
)  # fmt: skip


def by_family(
    check: Callable[[Sequence[RunLike]], tuple[bool | None, str]], runs: Sequence[RunLike]
) -> tuple[list[str], list[str]]:
    """``check`` on each family's runs: the families where it holds and those where it fails, each with its
    evidence (``family (evidence)``); a family with no runs to tell is in neither."""
    held, failed = [], []
    for family in sorted({r.data for r in runs}):
        status, evidence = check([r for r in runs if r.data == family])
        if status is not None:
            (held if status else failed).append(f"{family} ({evidence})")
    return held, failed


def general_findings(runs: Sequence[RunLike]) -> list[str]:
    """Each claim once, with each family's evidence: where it holds, where a family contradicts it."""
    lines = []
    for claim in CLAIMS:
        held, contradicted = by_family(claim.check, runs)
        if not held and not contradicted:
            continue
        line = f"{claim.text}. Holds on " + ("; ".join(held) if held else "no family") + "."
        if contradicted:
            kind = "a defect of the mask, not a finding:" if claim.defect else "contradicted by"
            line += f" **{kind}** " + "; ".join(contradicted) + "."
        lines.append(line)
    return lines
