"""Summarise a sweep: a Markdown table (one row per configuration, mean ± std over seeds) and PNG figures
of the drift and leak curves per strategy, written into the sweep folder.

    python scripts/report.py outputs/sweeps/<time>            # writes <sweep>/report.md, *.png; prints the table
    python scripts/report.py <sweep> --columns test/acc,drift/producer_l2/final --curves drift/stored_l2

A run is a folder with ``config.yaml`` (its own, or Hydra's ``.hydra/config.yaml`` for a job that failed
early); it counts as finished when it holds ``metrics.json``, and unfinished or failed runs are listed,
not reported. Runs that differ only in ``seed`` form one configuration. Curves are read from the runs'
TensorBoard event files: one figure per telemetry tag, one panel per configuration apart from the
strategy, one line per strategy (mean over seeds, the band spanning them).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pruneflow.pruning.strategies import RENAMED_STRATEGIES

DEFAULT_COLUMNS = (
    "test/acc",
    "drift/producer_l2/final",
    "drift/producer_l2/max",
    "drift/stored_l2/final",
    "drift/zero_fraction/final",
    "drift/consumer_l2/final",
    "grad/pruned_l2/final",
    "leak/activation_abs_mean/final",
    "leak/activation_abs_mean/max",
    "bn/beta_abs/final",
    "compact/acc_gap",
)
DEFAULT_CURVES = ("drift/producer_l2", "leak/activation_abs_mean")
STRATEGY_ORDER = ("unpruned", "control", "weight", "activation", "gradient", "parametrize", "hard")
# Below this a curve is drawn linearly, above logarithmically: exact zeros stay visible beside drifts of 1e-3 and 10.
SYMLOG_THRESHOLD = 1e-4


def find_runs(sweep: Path) -> tuple[dict[str, dict], list[str]]:
    """(finished runs by folder name → metrics, unfinished or failed run folders)."""
    finished, unfinished = {}, []
    # Hydra's .hydra/config.yaml marks a job that started, even one that failed before writing its own.
    runs = {
        config.parent.parent if config.parent.name == ".hydra" else config.parent
        for config in sweep.rglob("config.yaml")
    }
    for run in sorted(runs):
        name = str(run.relative_to(sweep))
        metrics_file = run / "metrics.json"
        try:
            finished[name] = json.loads(metrics_file.read_text())
        except (OSError, ValueError):  # absent: unfinished or failed (run.py writes it atomically, never half)
            unfinished.append(name)
    return finished, unfinished


def override_parts(run_name: str) -> list[str]:
    """A run folder's overrides: ``mask=weight,mask.layers=[a,b],seed=0`` → three parts (commas in brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in run_name:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if current else parts


def without(run_name: str, keys: Sequence[str]) -> str:
    return ",".join(part for part in override_parts(run_name) if part.split("=", 1)[0] not in keys)


def configuration(run_name: str) -> str:
    """The run's overrides without its seed: runs that differ only by seed share a configuration."""
    return without(run_name, ["seed"]) or run_name


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def markdown_table(runs: dict[str, dict], columns: Sequence[str]) -> str:
    groups: dict[str, list[dict]] = {}
    for name, metrics in runs.items():
        groups.setdefault(configuration(name), []).append(metrics)
    header = ["configuration", "runs", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config, members in sorted(groups.items()):
        cells = [f"`{config}`", str(len(members))]
        for column in columns:
            cells.append(fmt([m[column] for m in members if isinstance(m.get(column), (int, float))]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curves(run_dir: Path, tags: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``tag → (steps, values)`` from a run's event files, for the tags it logged."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = set(accumulator.Tags()["scalars"])
    curves = {}
    for tag in tags:
        if tag in logged:
            events = accumulator.Scalars(tag)
            curves[tag] = ([event.step for event in events], [event.value for event in events])
    return curves


def strategy_of(metrics: dict) -> str:
    strategy = str(metrics.get("mask/strategy", "unpruned"))
    return RENAMED_STRATEGIES.get(strategy, strategy)  # runs from before a rename (mask=none is now control)


def plot_curves(sweep: Path, runs: dict[str, dict], tag: str, curves: dict[str, dict]) -> Path | None:
    """One figure for ``tag``: a panel per configuration apart from strategy and seed, a line per strategy."""
    panels: dict[str, dict[str, list[tuple[list[int], list[float]]]]] = {}
    for name, metrics in runs.items():
        if tag in curves[name]:
            panel = without(name, ["mask", "seed"])
            panels.setdefault(panel, {}).setdefault(strategy_of(metrics), []).append(curves[name][tag])
    if not panels:
        return None
    shared = set.intersection(*(set(override_parts(panel)) for panel in panels))
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(5 * columns + 1.6, 3.6 * rows), squeeze=False, sharey=True, layout="constrained"
    )
    strategies = sorted({s for lines in panels.values() for s in lines}, key=_strategy_rank)
    # Strategies often coincide (activation and gradient share their kernels' drift, hard and parametrize
    # sit at 0): each later one is drawn thinner and dashed on top of the earlier, so all stay visible.
    styles = {
        strategy: {
            "color": plt.get_cmap("tab10")(index % 10),
            "linestyle": ("-", "--", "-.", ":")[index % 4],
            "linewidth": max(3.2 - 0.4 * index, 1.0),
        }
        for index, strategy in enumerate(strategies)
    }
    seeds = max(len(members) for lines in panels.values() for members in lines.values())
    for axis, (panel, lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        for strategy in sorted(lines, key=_strategy_rank):
            steps, mean, low, high = _over_seeds(lines[strategy])
            axis.plot(steps, mean, label=strategy, **styles[strategy])
            if len(lines[strategy]) > 1:
                axis.fill_between(steps, low, high, color=styles[strategy]["color"], alpha=0.15, linewidth=0)
        title = ",".join(part for part in override_parts(panel) if part not in shared)
        axis.set_title(title or "all runs", fontsize=10)
        axis.set_yscale("symlog", linthresh=SYMLOG_THRESHOLD)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel(tag)
    handles = [plt.Line2D([], [], label=strategy, **styles[strategy]) for strategy in strategies]
    figure.legend(handles=handles, title="mask", loc="outside right upper", fontsize=9)
    over = f"; mean over {seeds} seeds, band min–max" if seeds > 1 else ""
    figure.suptitle(f"{tag} by strategy ({', '.join(sorted(shared)) or 'all runs'}{over})", fontsize=11)
    out = sweep / f"{tag.replace('/', '_')}.png"
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _strategy_rank(strategy: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER), strategy)


def _over_seeds(curves: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, ...]:
    """Steps every seed logged, with the mean, minimum and maximum over seeds there."""
    steps = sorted(set.intersection(*(set(steps) for steps, _ in curves))) or curves[0][0]
    values = np.array([np.interp(steps, curve_steps, curve_values) for curve_steps, curve_values in curves])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def write_report(sweep: Path, columns: Sequence[str], curve_tags: Sequence[str], out: Path | None = None) -> str:
    """Write ``report.md`` and one PNG per curve tag into ``sweep``; returns the Markdown."""
    runs, unfinished = find_runs(sweep)
    if not runs and not unfinished:
        raise SystemExit(f"report: error: no runs (folders with config.yaml) under {sweep}")
    text = f"# Sweep {sweep}\n\n{len(runs)} finished runs"
    text += f", {len(unfinished)} unfinished or failed" if unfinished else ""
    text += "; mean ± std over seeds.\n\n" + markdown_table(runs, columns) + "\n"
    curves = {name: read_curves(sweep / name, curve_tags) for name in runs}
    for tag in curve_tags:
        figure = plot_curves(sweep, runs, tag, curves)
        if figure is not None:
            text += f"\n![{tag}]({figure.name})\n"
    if unfinished:
        text += "\nUnfinished or failed runs (no metrics.json), not reported:\n"
        text += "".join(f"- `{name}`\n" for name in unfinished)
    (out or sweep / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="metrics.json keys, comma-separated")
    parser.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="TensorBoard tags to plot, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/report.md")
    args = parser.parse_args()
    if not args.sweep.is_dir():
        raise SystemExit(
            f"report: error: {args.sweep} is not a folder; pass a sweep folder such as outputs/sweeps/<time>"
        )
    print(write_report(args.sweep, args.columns.split(","), [tag for tag in args.curves.split(",") if tag], args.out))


if __name__ == "__main__":
    main()
