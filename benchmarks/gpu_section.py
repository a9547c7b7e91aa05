"""Render the GPU section of docs/measurements.md from ``python -m benchmarks gpu --suite``'s JSON.

    python -m benchmarks gpu-section gpu.json                                # print the section
    python -m benchmarks gpu-section gpu.json --readme docs/measurements.md  # replace it between the markers

The section lies between ``<!-- gpu-section:begin -->`` and ``<!-- gpu-section:end -->``; a section the suite
could not measure says so, with the first line of its error, rather than leaving an old figure standing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- gpu-section:begin -->", "<!-- gpu-section:end -->"


def fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) else "–"


def failed(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    if "error" in section:
        return "failed: " + section["error"].strip().splitlines()[-1][:160]
    return None


def rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, figure) for each section of the suite."""
    sections = report.get("sections", {})
    out: list[tuple[str, str]] = []

    sync = sections.get("sync")
    if failed(sync):
        out.append(("host reads on ordinary steps", failed(sync) or ""))
    else:
        clean = [name for name, arm in sync.items() if isinstance(arm, dict) and arm.get("host_reads") == 0]
        broken = {name: arm.get("error", arm.get("ops")) for name, arm in sync.items()
                  if isinstance(arm, dict) and arm.get("host_reads") != 0}  # fmt: skip
        text = f"none in {len(clean)} of {len(clean) + len(broken)} strategies"
        if broken:
            text += "; reads in " + ", ".join(f"{name} ({str(why).strip().splitlines()[-1][:80]})"
                                              for name, why in broken.items())  # fmt: skip
        out.append(("host reads on ordinary steps (sync debug mode `error`, steps 4–20)", text))

    overhead = sections.get("overhead")
    out.append(("`train.py` / hand-written loop, MNIST, training steps only", failed(overhead) or ", ".join(
        f"{setting.replace('_', ' ')}: **{fmt(figures['ratio_median'])}×**"
        for setting, figures in overhead.items() if isinstance(figures, dict))))  # fmt: skip

    host = sections.get("host")
    out.append(("host time a step, pruneflow / plain Lightning (tiny network)", failed(host) or
                f"**{fmt(host['ratio_pruneflow_vs_lightning'])}×** ({fmt(host['median_ms']['pruneflow'])} vs "
                f"{fmt(host['median_ms']['lightning'])} ms)"))  # fmt: skip

    compiled = sections.get("compile")
    out.append(("`compile=true compile_mode=reduce-overhead` / eager, samples/s", failed(compiled) or
                f"**{fmt(compiled['ratio'])}×**"))  # fmt: skip

    startup = sections.get("startup")
    if failed(startup):
        out.append(("start-up", failed(startup) or ""))
    else:
        phases = startup["phases"]
        listed = ", ".join(f"{key.split('/')[-1].removesuffix('_seconds')} {value:.2f}"
                           for key, value in phases.items() if key != "perf/startup_seconds")  # fmt: skip
        out.append(("start-up to the first step's end", f"{phases['perf/startup_seconds']:.2f} s = "
                    f"**{fmt(startup['ratio_first_step_vs_imports'])}×** `import torch, lightning` "
                    f"({startup['import_torch_lightning_seconds']:.2f} s); phases (s): {listed}"))  # fmt: skip

    latency = sections.get("latency")
    if failed(latency):
        out.append(("compaction latency on the device", failed(latency) or ""))
    else:
        for precision, figures in latency.items():
            if not isinstance(figures, dict):
                continue
            device = figures.get("compact/latency_device", "?")
            cells = ", ".join(f"batch {b}: {fmt(figures.get(f'compact/latency_{device}_b{b}_before_ms'))} → "
                              f"{fmt(figures.get(f'compact/latency_{device}_b{b}_after_ms'))} ms"
                              for b in (1, 256))  # fmt: skip
            out.append((f"compaction latency, half-pruned small VGG, {device}, {precision}", cells))

    cut = sections.get("cut")
    out.append(("cut while training, fine-tuning speedup at batch 512", failed(cut) or ", ".join(
        f"{name} **×{fmt(figures['speedup'])}** (FLOPs ×{fmt(figures['cut']['flops_ratio'])})"
        for name, figures in cut.items() if isinstance(figures, dict))))  # fmt: skip

    defaults = sections.get("defaults")
    if failed(defaults):
        out.append(("precision / memory format by model size", failed(defaults) or ""))
    else:
        for row in defaults["rows"]:
            speedups = ", ".join(f"{setting} {fmt(value)}×" for setting, value in row["speedup"].items())
            out.append((f"{row['model']} ({fmt(row['gflops_per_batch'])} GFLOPs a batch of {row['batch']})",
                        f"{speedups}; auto picks {row['auto']}" + (" (**slower**)" if row["auto_slower"] else "")))
        out.append(("suggested `SPEED_RULES['cuda']`", json.dumps(defaults.get("suggested"))))
    return out


def render(report: dict[str, Any]) -> str:
    versions = report.get("versions", {})
    head = (f"Measured on {report.get('device', '?')} (torch {versions.get('torch', '?')}, Lightning "
            f"{versions.get('lightning', '?')}) by `python -m benchmarks gpu --suite --root <data folder> "
            f"--json <output folder>/gpu.json` in {fmt(report.get('seconds'), 4)} s"
            + (" (**--tiny dry run: not figures**)" if report.get("tiny") else "") + ".")  # fmt: skip
    table = ["| what | figure |", "| --- | --- |", *(f"| {what} | {figure} |" for what, figure in rows(report))]
    return "\n".join([BEGIN, head, "", *table, END])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report", type=Path)
    parser.add_argument("--readme", type=Path, help="replace the section between the markers in this Markdown file "
                        "(docs/measurements.md)")


def run(args: argparse.Namespace) -> None:
    section = render(json.loads(args.report.read_text()))
    if args.readme is None:
        print(section)
        return
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"benchmarks gpu-section: error: {args.readme} has no {BEGIN} ... {END} markers")
    before, rest = text.split(BEGIN, 1)
    args.readme.write_text(before + section + rest.split(END, 1)[1])



