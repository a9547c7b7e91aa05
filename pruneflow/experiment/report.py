"""Summarise a sweep: a Markdown table (one row per configuration, mean ± std over seeds) and PNG figures
of the drift and leak curves per strategy, written into the sweep folder.

    pruneflow-report outputs/sweeps/<time>            # writes <sweep>/report.md, *.png; prints the table
    pruneflow-report <sweep> --columns test/acc,drift/producer_l2/final --curves drift/stored_l2
    pruneflow-report outputs/sweeps/findings/<date> --findings docs/FINDINGS.md   # the findings report
    pruneflow-report outputs/sweeps/findings/<date> outputs/sweeps/findings/families --findings docs/FINDINGS.md

(``pruneflow-report`` is installed with the package; ``python -m pruneflow.experiment.report`` is the same.)

A run is a folder with ``config.yaml`` (its own, or Hydra's ``.hydra/config.yaml`` for a job that failed
early); it counts as finished when it holds ``metrics.json``, and unfinished or failed runs are listed,
not reported (a failed one with the error line its log recorded). Runs that differ only in ``seed`` form
one configuration. Curves are read from the runs' TensorBoard event files: one figure per telemetry tag,
one panel per configuration apart from the strategy, one line per strategy (mean over seeds, the band
spanning them).

``--findings <file.md>`` writes the findings report of an ``experiment=findings`` sweep (and its
``findings_cifar`` slice, in subfolders of one sweep folder): the sweep commands (from Hydra's
``multirun.yaml``) and wall time at the top, per data set and optimizer a table with mean ± std over
seeds, figures of the transients (producer drift against optimizer steps since pruning, one line per
strategy, a panel per optimizer and activation) beside the file, and plain sentences stating the
findings with the numbers behind them. It takes several sweep folders, or one folder holding a sweep per
network family (``outputs/sweeps/findings/families/<family>``, ``experiment=findings_<family>``); each network
(data set and model) is a section of the sentences and tables. With the ConvNet/VGG sweeps among the folders,
their findings stay in the report beside the families'.

Each finished run's network is rebuilt from its last checkpoint and probed where its family has a new trap
(``traps``: the skip path, the squeeze-and-excitation gate, the LayerNorms, the layer scale, attention heads, at
the pruned channels; cached as ``<run>/traps.json``, so a rerun is quick; ``--no-traps`` skips it). The tables then
carry the trap columns and a one-line cause per cell, a section states each family's traps, and the ConvNet/VGG
findings are checked on every network once, with each network's evidence and, where one contradicts a finding,
saying so (``trap_findings``). A sweep still running is reported as far as it got: the runs each sweep has out of
its grid are listed at the top, and each cell says how many runs it has.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pruneflow.experiment.published_claims import published_comparison
from pruneflow.experiment.report_cells import fmt, values
from pruneflow.experiment.trap_findings import (
    TRAP_COLUMNS,
    cell_cause,
    general_findings,
    grid_size,
    trap_sentences,
    with_traps,
)
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


def failure_line(run: Path) -> str | None:
    """Why a run failed, as its log file recorded it: the last ERROR line of ``<run>/*.log`` (``train.py``
    writes one for every error that ends a run), without the log's time and logger prefix."""
    errors = [
        line.split(" - ", 1)[-1].strip()
        for log_file in sorted(run.glob("*.log"))
        for line in log_file.read_text(errors="replace").splitlines()
        if "[ERROR] - " in line
    ]
    return errors[-1] if errors else None


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


def wrapped(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken at spaces and commas into lines that fit ``width_inches`` at ``fontsize``: constrained layout
    makes room for a tall title, never for one wider than the figure, which it clips."""
    characters = max(int(width_inches * 72 / (0.6 * fontsize)), 20)  # a character is ~0.6 em wide
    return textwrap.fill(text.replace(",", ", ").replace(",  ", ", "), characters)


def set_panel_title(axis: plt.Axes, title: str, width_inches: float) -> None:
    """A panel's title wrapped to its axes, which take about 80 % of the panel's ``width_inches`` (the rest: ticks
    and labels); a wider title would run over the neighbouring panel or past the figure's edge."""
    axis.set_title(wrapped(title, 0.8 * width_inches, 10), fontsize=10)


def save_figure(figure: plt.Figure, handles: list[plt.Line2D], title: str, out: Path) -> Path:
    """The legend in a row below the panels, where it covers neither a panel nor the title, and the title wrapped
    to the figure's width; written to ``out``."""
    columns = max(1, min(len(handles), int(figure.get_figwidth() / 1.4)))  # an entry takes up to ~1.4 inches
    figure.legend(handles=handles, title="mask", loc="outside lower center", ncols=columns, fontsize=9)
    figure.suptitle(wrapped(title, figure.get_figwidth(), 11), fontsize=11)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


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
        rows, columns, figsize=(5 * columns, 3.6 * rows + 1.0), squeeze=False, sharey=True, layout="constrained"
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
        set_panel_title(axis, title or "all runs", width_inches=5)
        axis.set_yscale("symlog", linthresh=SYMLOG_THRESHOLD)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel(tag)
    handles = [plt.Line2D([], [], label=strategy, **styles[strategy]) for strategy in strategies]
    over = f"; mean over {seeds} seeds, band min–max" if seeds > 1 else ""
    title = f"{tag} by strategy ({', '.join(sorted(shared)) or 'all runs'}{over})"
    return save_figure(figure, handles, title, sweep / f"{tag.replace('/', '_')}.png")


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
        for name in unfinished:
            reason = failure_line(sweep / name)
            text += f"- `{name}`" + (f": {reason}" if reason else "") + "\n"
    (out or sweep / "report.md").write_text(text)
    return text


# -- the findings report ---------------------------------------------------------------------------------
# (metrics.json key, column title) of the findings tables; a column whose cells are all empty is left out.
FINDINGS_COLUMNS = (
    ("test/acc", "test acc"),
    ("drift/producer_l2/final", "drift (L2)"),
    ("drift/stored_l2/final", "stored drift"),
    ("drift/zero_fraction/final", "at zero"),
    ("burst/steps_to_half_drift", "steps to ½ drift"),
    ("leak/activation_abs_mean/final", "leak train"),
    ("leak/eval_activation_abs_mean/final", "leak eval"),
    ("optim/pruned_update_l2/max", "update max"),
    ("optim/pruned_momentum_l2/max", "momentum max"),
    ("optim/pruned_exp_avg_l2/max", "exp_avg max"),
    ("optim/pruned_decay_l2/max", "decay max"),
    ("compact/acc_gap", "compaction gap"),
)
TRANSIENT_TAG = "drift/producer_l2"
TRAP_KEYS = {key for key, _ in TRAP_COLUMNS}


class Run(NamedTuple):
    """One finished run of a findings sweep, described by what it computed (read from its config).

    (A NamedTuple, not a dataclass: tests load this script as a module that is not in ``sys.modules``.)"""

    name: str
    data: str
    optimizer: str
    activation: str
    timing: str
    label: str
    seed: int
    metrics: dict


def describe_run(sweep: Path, name: str, metrics: dict) -> Run:
    config = OmegaConf.load(sweep / name / "config.yaml")
    mask = config.get("mask") or {}
    strategy = str(metrics.get("mask/strategy", "unpruned"))
    label = f"{strategy}+reset" if metrics.get("mask/reset_optimizer_state") else strategy
    data = str(config.data._target_).rsplit(".", 1)[-1].removesuffix("DataModule")
    model = str(config.model._target_).rsplit(".", 1)[-1]
    if mask.get("at_step") is not None:
        timing = f"at step {mask.get('at_step')}"
    elif not mask.get("at_epoch"):
        timing = "at initialisation"
    else:
        epochs = int(mask.get("at_epoch"))
        timing = f"after {epochs} epoch{'s' if epochs > 1 else ''}"
    return Run(
        name=name, data=f"{data} / {model}", optimizer=str(config.optimizer._target_).rsplit(".", 1)[-1],
        activation=str(config.model.get("activation", "n/a")), timing=timing, label=label,
        seed=int(config.get("seed", 0)), metrics=metrics,
    )  # fmt: skip


def relative(path: str | Path) -> str:
    """``path`` relative to the working directory: a committed report names no folder of the machine it was
    made on (an absolute path stays only where no relative one exists, as across Windows drives)."""
    if not os.path.isabs(path):
        return str(path)
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def portable_override(override: str) -> str:
    """``key=/abs/path`` as ``key=<path relative to the working directory>``; any other override unchanged."""
    key, sep, value = override.partition("=")
    return f"{key}{sep}{relative(value)}" if sep and os.path.isabs(value) else override


def sweep_commands(sweep: Path) -> list[str]:
    """The command line of each Hydra multirun under ``sweep``, rebuilt from its ``multirun.yaml``."""
    commands = []
    for multirun in sorted(sweep.rglob("multirun.yaml")):
        overrides = OmegaConf.load(multirun).hydra.overrides
        parts = [o for o in overrides.hydra if not str(o).startswith("hydra.mode=")] + list(overrides.task)
        commands.append("python train.py -m " + " ".join(portable_override(str(part)) for part in parts))
    return commands


def wall_hours(sweep: Path, runs: Sequence[Run]) -> tuple[float, float]:
    """(hours from the first run's start to the last metrics.json, summed hours of the runs' own wall time)."""
    starts = [(sweep / run.name / "config.yaml").stat().st_mtime for run in runs]
    ends = [(sweep / run.name / "metrics.json").stat().st_mtime for run in runs]
    total = sum(float(run.metrics.get("wall_seconds", 0.0)) for run in runs)
    return (max(ends) - min(starts)) / 3600, total / 3600


def findings_tables(runs: Sequence[Run]) -> str:
    """Per data set and optimizer: a row per (pruning time, activation, strategy), mean ± std over seeds."""
    text = ""
    for data in sorted({r.data for r in runs}):
        for optimizer in sorted({r.optimizer for r in runs if r.data == data}):
            members = [r for r in runs if r.data == data and r.optimizer == optimizer]
            columns = [(key, title) for key, title in (*FINDINGS_COLUMNS, *TRAP_COLUMNS) if values(members, key)]
            causes = any(key in TRAP_KEYS for key, _ in columns)  # the probe measured this family
            groups: dict[tuple[str, str, str], list[Run]] = {}
            for run in members:
                groups.setdefault((run.timing, run.activation, run.label), []).append(run)
            header = ["pruned", "activation", "strategy", "seeds", *(title for _, title in columns)]
            header += ["cause"] if causes else []
            lines = [f"\n### {data}, {optimizer}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            order = sorted(groups, key=lambda key: (key[0], key[1], _strategy_rank(key[2])))
            for timing, activation, label in order:
                group = groups[(timing, activation, label)]
                cells = [timing, activation, f"`{label}`", str(len(group))]
                cells += [fmt(values(group, key)) for key, _ in columns]
                cells += [cell_cause(group)] if causes else []
                lines.append("| " + " | ".join(cells) + " |")
            text += "\n".join(lines) + "\n"
    return text


def transient_panels(sweep: Path, runs: Sequence[Run]) -> dict[tuple[str, str], dict[str, list]]:
    """``(activation, optimizer) → strategy → [(steps since the first pruning event, drift)]`` per run."""
    panels: dict[tuple[str, str], dict[str, list]] = {}
    for run in runs:
        curve = read_curves(sweep / run.name, [TRANSIENT_TAG]).get(TRANSIENT_TAG)
        if curve is None or not run.metrics.get("mask/pruning_steps"):
            continue
        event = run.metrics["mask/pruning_steps"][0]
        since = [(step - event, value) for step, value in zip(*curve, strict=True) if step > event]
        if since:
            steps, drift = zip(*since, strict=True)
            panels.setdefault((run.activation, run.optimizer), {}).setdefault(run.label, []).append(
                (list(steps), list(drift))
            )
    return panels


def plot_transients(sweep: Path, runs: Sequence[Run], out_dir: Path, stem: str) -> list[Path]:
    """Per data set and pruning time, a figure of the producer drift against steps since pruning: a panel
    per (activation, optimizer), a line per strategy (mean over seeds, band min–max)."""
    figures = []
    for data in sorted({r.data for r in runs}):
        for timing in sorted({r.timing for r in runs if r.data == data}):
            panels = transient_panels(sweep, [r for r in runs if r.data == data and r.timing == timing])
            if not panels:
                continue
            activations = sorted({a for a, _ in panels})
            optimizers = sorted({o for _, o in panels})
            figure, axes = plt.subplots(
                len(activations), len(optimizers), figsize=(4.6 * len(optimizers), 3.4 * len(activations) + 1.0),
                squeeze=False, sharex=True, sharey=True, layout="constrained",
            )  # fmt: skip
            labels = sorted({label for lines in panels.values() for label in lines}, key=_strategy_rank)
            styles = {
                label: {"color": plt.get_cmap("tab10")(i % 10), "linestyle": ("-", "--", "-.", ":")[i % 4],
                        "linewidth": max(3.0 - 0.3 * i, 1.0)}
                for i, label in enumerate(labels)
            }  # fmt: skip
            for row, activation in enumerate(activations):
                for column, optimizer in enumerate(optimizers):
                    axis = axes[row][column]
                    lines = panels.get((activation, optimizer), {})
                    for label in sorted(lines, key=_strategy_rank):
                        steps, mean, low, high = _over_seeds(lines[label])
                        axis.plot(steps, mean, label=label, **styles[label])
                        if len(lines[label]) > 1:
                            axis.fill_between(steps, low, high, color=styles[label]["color"], alpha=0.15, linewidth=0)
                    set_panel_title(axis, f"{optimizer}, {activation}", width_inches=4.6)
                    axis.set_yscale("symlog", linthresh=SYMLOG_THRESHOLD)
                    axis.set_xscale("log")  # the first steps after pruning matter most
                    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                    axis.grid(alpha=0.3)
                    if row == len(activations) - 1:
                        axis.set_xlabel("optimizer steps since pruning")
                    if column == 0:
                        axis.set_ylabel(TRANSIENT_TAG)
            handles = [plt.Line2D([], [], label=label, **styles[label]) for label in labels]
            title = f"Drift of the pruned kernels after pruning: {data}, pruned {timing}"
            slug = "_".join("".join(c if c.isalnum() else " " for c in f"{data} {timing}").lower().split())
            figures.append(save_figure(figure, handles, title, out_dir / f"{stem}_transient_{slug}.png"))
    return figures


def _mean_std(runs: Sequence[Run], key: str) -> str:
    return fmt(values(runs, key))


def _by_cell(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by "<pruning time>, <activation>" (the grid's cells apart from optimizer and seed), in order."""
    cells: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.timing, r.activation)):
        cells.setdefault(f"{run.timing}, {run.activation}", []).append(run)
    return cells


def _at_zero(runs: Sequence[Run]) -> bool:
    fractions = values(runs, "drift/zero_fraction/final")
    return bool(fractions) and len(fractions) == len(runs) and min(fractions) == 1


def _per_cell(runs: Sequence[Run], key: str) -> str:
    """``key`` per cell, e.g. "at initialisation, relu 0 ± 0; after 1 epoch, silu 9.8 ± 1.2"; empty for one cell."""
    cells = {cell: members for cell, members in _by_cell(runs).items() if values(members, key)}
    if len(cells) < 2:
        return ""
    return "; ".join(f"{cell} {_mean_std(members, key)}" for cell, members in cells.items())


def _cell_list(chosen: Sequence[str], cells: Sequence[str]) -> str:
    """``chosen`` cells in words, a pruning time whose every activation is chosen said once:
    "at initialisation under every activation", else "at initialisation, relu and after 1 epoch, silu"."""
    timings = dict.fromkeys(cell.split(", ")[0] for cell in cells)
    words = []
    for timing in timings:
        of_timing = [cell for cell in cells if cell.split(", ")[0] == timing]
        picked = [cell for cell in of_timing if cell in chosen]
        if picked and len(picked) == len(of_timing) > 1:
            words.append(f"{timing} under every activation")
        else:
            words.extend(picked)
    return " and ".join(words)


def findings_sentences(runs: Sequence[Run]) -> list[str]:
    """Plain statements of what the sweep shows, each with the numbers behind it (mean ± std over runs)."""
    sentences = []
    for data in sorted({r.data for r in runs}):
        pruned = [r for r in runs if r.data == data and r.label != "unpruned"]
        labels = sorted({r.label for r in pruned}, key=_strategy_rank)
        by_label = {label: [r for r in pruned if r.label == label] for label in labels}
        held = [label for label in labels if _at_zero(by_label[label])]
        if held:
            count = sum(len(by_label[label]) for label in held)
            sentences.append(
                f"{data}: {', '.join(f'`{label}`' for label in held)} kept every pruned kernel at exactly zero in "
                f"all {count} of their runs (fraction of pruned kernels at zero = 1 at the end of training)."
            )
        for label in labels:
            if label in held:
                continue
            cells = _by_cell(by_label[label])
            zero_cells = [cell for cell, members in cells.items() if _at_zero(members)]
            if zero_cells:
                runs_held = sum(len(cells[cell]) for cell in zero_cells)
                elsewhere = [run for cell, members in cells.items() if cell not in zero_cells for run in members]
                moved = sum(1 for value in values(elsewhere, "drift/producer_l2/final") if value > 0)
                sentences.append(
                    f"{data}: `{label}` kept its pruned kernels at exactly zero only when pruned "
                    f"{_cell_list(zero_cells, cells)} ({runs_held} runs, every optimizer); elsewhere {moved} of its "
                    f"{len(elsewhere)} runs ended with them off zero (per optimizer below)."
                )
        weight_cells = _by_cell(by_label.get("weight", []))
        dead, alive = weight_cells.get("at initialisation, relu", []), weight_cells.get("at initialisation, silu", [])
        came_back = values(alive, "drift/producer_l2/final")
        if _at_zero(dead) and came_back and min(came_back) > 0:
            sentences.append(
                f"{data}: why `weight` holds at initialisation under ReLU only: BatchNorm's β starts at 0, so a "
                f"zeroed channel leaves the norm as exactly 0, where ReLU passes no gradient (|β| at the end "
                f"{_mean_std(dead, 'bn/beta_abs/final')}); SiLU passes half of it at 0 and the same kernels came back "
                f"to L2 = {_mean_std(alive, 'drift/producer_l2/final')} (|β| {_mean_std(alive, 'bn/beta_abs/final')}). "
                "Pruned after pre-training, β is no longer 0 and ReLU passes the gradient too."
            )
        for optimizer in sorted({r.optimizer for r in pruned}):
            group = {label: [r for r in members if r.optimizer == optimizer] for label, members in by_label.items()}
            weight = group.get("weight", [])
            if values(weight, "drift/producer_l2/final"):
                cells = _per_cell(weight, "drift/producer_l2/final")
                carrier = "momentum" if values(weight, "optim/pruned_momentum_l2/max") else "exp_avg"
                carried_by = "SGD's momentum buffer" if carrier == "momentum" else "Adam's first moment (exp_avg)"
                sentences.append(
                    f"{data}, {optimizer}: `weight`-pruned kernels came back to L2 = "
                    f"{_mean_std(weight, 'drift/producer_l2/final')} by the end ({len(weight)} runs"
                    + (f"; by cell: {cells}" if cells else "")
                    + f"), reaching half of that {_mean_std(weight, 'burst/steps_to_half_drift')} optimizer steps "
                    f"after pruning, pushed by a gradient of up to {_mean_std(weight, 'grad/pruned_l2/max')} (L2)"
                    + (
                        f" and {carried_by} at up to {_mean_std(weight, f'optim/pruned_{carrier}_l2/max')}."
                        if values(weight, f"optim/pruned_{carrier}_l2/max")
                        else "."
                    )
                )
            gradient, reset = group.get("gradient", []), group.get("activation+reset", [])
            carrier = "momentum" if values(gradient, "optim/pruned_momentum_l2/max") else "exp_avg"
            if values(gradient, "drift/producer_l2/final"):
                sentences.append(
                    f"{data}, {optimizer}: `gradient` zeroes the gradient, yet its kernels drifted to L2 = "
                    f"{_mean_std(gradient, 'drift/producer_l2/final')}: the optimizer state gathered before pruning "
                    f"({carrier} up to {_mean_std(gradient, f'optim/pruned_{carrier}_l2/max')}) moved them by up to "
                    f"{_mean_std(gradient, 'optim/pruned_update_l2/max')} per step"
                    + (
                        f"; with the state reset (`activation+reset`) the drift was "
                        f"{_mean_std(reset, 'drift/producer_l2/final')}."
                        if values(reset, "drift/producer_l2/final")
                        else "."
                    )
                )
            parametrize = group.get("parametrize", [])
            if values(parametrize, "drift/stored_l2/final"):
                sentences.append(
                    f"{data}, {optimizer}: `parametrize` holds the effective kernels at zero (fraction "
                    f"{_mean_std(parametrize, 'drift/zero_fraction/final')}) while the stored weight, never zeroed, "
                    f"kept an L2 of {_mean_std(parametrize, 'drift/stored_l2/final')} (its norm when pruned, less "
                    f"what weight decay took: a pull of up to {_mean_std(parametrize, 'optim/pruned_decay_l2/max')} "
                    "a step)."
                )
        for label in ("weight", "gradient", "hard", "activation"):
            members = by_label.get(label, [])
            if values(members, "leak/eval_activation_abs_mean/final"):
                sentences.append(
                    f"{data}: pruned channels under `{label}` leaked a mean |activation| of "
                    f"{_mean_std(members, 'leak/activation_abs_mean/final')} in train mode and "
                    f"{_mean_std(members, 'leak/eval_activation_abs_mean/final')} in eval mode (running variance "
                    f"of the pruned channels {_mean_std(members, 'bn/pruned_running_var/final')})."
                )
        gaps = [(label, gap) for label in labels if (gap := values(by_label[label], "compact/acc_gap"))]
        if gaps:
            cells = "; ".join(f"`{label}` {fmt(gap)}" for label, gap in gaps)
            sentences.append(f"{data}: test-accuracy gap after cutting the pruned channels out: {cells}.")
    return sentences


def find_sweeps_runs(sweeps: Sequence[Path]) -> tuple[Path, dict[str, dict], list[str]]:
    """(the folder the sweeps share, finished runs by folder name relative to it → metrics, unfinished ones)."""
    root = Path(os.path.commonpath([sweep.resolve() for sweep in sweeps])) if len(sweeps) > 1 else sweeps[0]
    finished: dict[str, dict] = {}
    unfinished: list[str] = []
    for sweep in sweeps:
        done, started = find_runs(sweep)
        within = sweep.resolve().relative_to(root.resolve())
        finished.update((str(within / name), metrics) for name, metrics in done.items())
        unfinished += [str(within / name) for name in started]
    return root, finished, unfinished


def sweep_progress(root: Path, sweeps: Sequence[Path], finished: dict[str, dict], unfinished: list[str]) -> str:
    """Per sweep of the grid (a folder with Hydra's ``multirun.yaml``): its finished runs out of its grid's, and
    those started and not finished, in one line each; empty for a single sweep that finished."""
    lines = []
    for sweep in sweeps:
        for multirun in sorted(sweep.rglob("multirun.yaml")):
            within = multirun.parent.resolve().relative_to(root.resolve())
            prefix = "" if str(within) == "." else f"{within}/"
            done = sum(name.startswith(prefix) for name in finished)
            started = sum(name.startswith(prefix) for name in unfinished)
            grid = grid_size(multirun.parent)
            if grid is None or done < grid:
                of = f" of {grid}" if grid else ""
                lines.append(f"- `{relative(multirun.parent)}`: {done}{of} runs finished"
                             + (f", {started} started and not finished" if started else "") + "\n")  # fmt: skip
    return "".join(lines)


def bullet_section(title: str, introduction: str, lines: Sequence[str]) -> str:
    """A section of the findings report: its title, a sentence, a bullet per line; nothing without lines."""
    if not lines:
        return ""
    return f"\n## {title}\n\n{introduction}\n\n" + "".join(f"- {line}\n" for line in lines)


def write_findings(sweeps: Path | Sequence[Path], out: Path, traps: bool = True) -> str:
    """Write the findings report of one or more sweeps to ``out`` (figures beside it); returns the Markdown.
    ``traps``: measure each finished run's traps at its pruned channels (``traps``; cached in its folder)."""
    sweeps = [sweeps] if isinstance(sweeps, Path) else list(sweeps)
    root, finished, unfinished = find_sweeps_runs(sweeps)
    if not finished:
        raise SystemExit(
            f"report: error: no finished runs (folders with metrics.json) under {', '.join(map(str, sweeps))}"
        )
    failures: dict[str, str] = {}
    runs = [describe_run(root, name, with_traps(root, name, metrics, failures) if traps else metrics)
            for name, metrics in finished.items()]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    span, total = wall_hours(root, runs)
    commands = [command for sweep in sweeps for command in sweep_commands(sweep)]
    commands = commands or ["(no multirun.yaml found: not a Hydra multirun)"]
    text = "# Findings: do pruned channels stay pruned, and what moves them back?\n\n"
    generated_by = f"pruneflow-report {' '.join(relative(sweep) for sweep in sweeps)} --findings {relative(out)}"
    text += f"Generated by `{generated_by}` from the sweep{'s' if len(commands) > 1 else ''} run with:\n\n"
    text += "```bash\n" + "\n".join(commands) + "\n```\n\n"
    text += f"{len(runs)} finished runs"
    text += f", {len(unfinished)} unfinished or failed (left out)" if unfinished else ""
    text += (
        f"; {span:.2f} h from the first start to the last finish ({total:.2f} h of run time summed). Cells are "
        "mean ± std over seeds. Drift is the L2 norm of the pruned channels' producing kernels (0: still pruned); "
        "the optimizer's shares are their largest value over the measured steps.\n"
    )
    progress = sweep_progress(root, sweeps, finished, unfinished)
    if progress:
        text += "\nSweeps still short of their grid (a cell's `seeds` column says how many runs it has):\n\n" + progress
    text += bullet_section(
        "Findings across the networks",
        "The ConvNet/VGG findings, checked on each network (evidence per network; where one contradicts a finding, "
        "it says so):",
        general_findings(runs),
    )
    text += bullet_section(
        "The traps at the pruned channels",
        "Measured by `pruneflow.experiment.traps` on each run's last checkpoint, one test batch in eval mode "
        "(mean ± std over runs): what the stream's readers receive through the skip path, the squeeze-and-"
        "excitation gate and product, the LayerNorms' statistics and output, the layer scale, at pruned "
        "channels against kept ones.",
        trap_sentences(runs, _strategy_rank),
    )
    text += bullet_section(
        "Against the published claims",
        "What has been said, without figures, about masked weights coming back, checked on each network's runs:",
        published_comparison(runs),
    )
    text += "\n## Findings\n\n" + "".join(f"- {sentence}\n" for sentence in findings_sentences(runs))
    text += "\n## The transient after pruning\n\n"
    for figure in plot_transients(root, runs, out.parent, out.stem.lower()):
        text += f"![{figure.stem}]({figure.name})\n\n"
    text += "## Tables\n" + findings_tables(runs)
    if unfinished:
        text += "\nUnfinished or failed runs (no metrics.json), not reported:\n"
        text += "".join(f"- `{name}`\n" for name in unfinished)
    if failures:
        text += "\nRuns the trap probe could not rebuild (no trap readings):\n"
        text += "".join(f"- `{name}`: {reason}\n" for name, reason in failures.items())
    out.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """The ``pruneflow-report`` command."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, nargs="+", help="a sweep folder; for --findings, one or more")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="metrics.json keys, comma-separated")
    parser.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="TensorBoard tags to plot, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/report.md")
    parser.add_argument("--findings", type=Path, default=None, help="write the findings report here instead")
    parser.add_argument("--no-traps", action="store_true", help="--findings without the trap probe")
    args = parser.parse_args(argv)
    for sweep in args.sweep:
        if not sweep.is_dir():
            raise SystemExit(
                f"report: error: {sweep} is not a folder; pass a sweep folder such as outputs/sweeps/<time>"
            )
    if args.findings is not None:
        print(write_findings(args.sweep, args.findings, traps=not args.no_traps))
        return
    if len(args.sweep) > 1:
        raise SystemExit(
            f"report: error: {len(args.sweep)} sweep folders given; one without --findings, several with it"
        )
    tags = [tag for tag in args.curves.split(",") if tag]
    print(write_report(args.sweep[0], args.columns.split(","), tags, args.out))


if __name__ == "__main__":
    main()
