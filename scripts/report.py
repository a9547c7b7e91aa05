"""Summarise a sweep: one Markdown row per configuration, mean ± std over seeds, failed runs listed.

    python scripts/report.py outputs/sweeps/<time>            # writes <sweep>/report.md and prints it
    python scripts/report.py <sweep> --columns test/acc,drift/producer_l2/final

A run is a folder with ``config.yaml``; it counts as finished when it holds ``metrics.json``.
Runs that differ only in ``seed`` form one configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

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
)


def find_runs(sweep: Path) -> tuple[dict[str, dict], list[str]]:
    """(finished runs by folder name → metrics, unfinished or failed run folders)."""
    finished, unfinished = {}, []
    for config in sorted(sweep.rglob("config.yaml")):
        run = config.parent
        if run.name == ".hydra":  # Hydra's own copy of the unresolved config
            continue
        name = str(run.relative_to(sweep)) or run.name
        metrics_file = run / "metrics.json"
        if metrics_file.is_file():
            finished[name] = json.loads(metrics_file.read_text())
        else:
            unfinished.append(name)
    return finished, unfinished


def configuration(run_name: str) -> str:
    """The run's overrides without its seed: runs that differ only by seed share a configuration."""
    parts = [part for part in run_name.split(",") if not part.startswith("seed=")]
    return ",".join(parts) or run_name


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def markdown_table(runs: dict[str, dict], columns: list[str]) -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS))
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/report.md")
    args = parser.parse_args()
    if not args.sweep.is_dir():
        raise SystemExit(
            f"report: error: {args.sweep} is not a folder; pass a sweep folder such as outputs/sweeps/<time>"
        )
    runs, unfinished = find_runs(args.sweep)
    if not runs and not unfinished:
        raise SystemExit(f"report: error: no runs (folders with config.yaml) under {args.sweep}")
    text = f"# Sweep {args.sweep}\n\n{len(runs)} finished runs; mean ± std over seeds.\n\n"
    text += markdown_table(runs, args.columns.split(",")) + "\n"
    if unfinished:
        text += "\nUnfinished or failed runs (no metrics.json):\n" + "".join(f"- `{name}`\n" for name in unfinished)
    out = args.out or args.sweep / "report.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
