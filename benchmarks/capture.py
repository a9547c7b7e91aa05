"""How far each way of capturing a model reaches: timm models (or the smallest of each timm module) captured by
``torch.fx`` with the graph's own leaves only ("plain", as before the graph read timm's declarations), with timm's
declared leaves and functions too ("declared"), with the opaque-leaf fallback instead of timm's declarations
("fallback"), with both (what the channel graph does), and optionally by
``torch.export`` (``--export``: concrete shapes, ATen ops, no module kept whole; slow on a CPU).

Each model is built on the meta device (nothing allocated; a builder that cannot is built on the CPU) with 10
classes. A row says, per way, whether the model was captured and how many submodules were kept whole because
``torch.fx`` cannot trace them, or the failure's one line. Nothing is pruned here; what the graph then cuts is
``python -m benchmarks timm``.

    python -m benchmarks capture --models convit_tiny,mobilevit_xxs,twins_svt_small
    python -m benchmarks capture --json capture.json          # the smallest model of each timm module
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.timm_models import smallest_models
from pruneflow.graph import registry
from pruneflow.graph.capture import capture, first_line

WAYS = ("plain", "declared", "fallback", "both")


def build(name: str) -> nn.Module:
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, num_classes=10)
    except Exception:  # a builder that computes on tensors while building
        return timm.create_model(name, num_classes=10)


def without_timm() -> tuple[registry.LeafTest, list[Any]]:
    """The graph's leaf test and autowrapped functions, less those timm declares (``timm.layers._fx``)."""
    from timm.layers import _fx as timm_fx

    modules, functions = set(timm_fx.get_notrace_modules()), set(timm_fx.get_notrace_functions())
    return (lambda module: registry.is_leaf(module) and type(module) not in modules,
            [f for f in registry.AUTOWRAP_FUNCTIONS if f not in functions])  # fmt: skip


def attempt(way: str, model: nn.Module) -> str:
    """One way of capturing ``model``: "captured, N kept whole" or "fails: <the failure's line>"."""
    try:
        if way in ("plain", "fallback"):  # timm's declarations left out: the graph's own leaves only
            leaves, functions = without_timm()
            captured = capture(model, leaves=leaves, functions=functions, fallback=way == "fallback")
            return f"captured, {len(captured.opaque)} kept whole"
        if way == "export":
            size = model.pretrained_cfg["input_size"][-1] if hasattr(model, "pretrained_cfg") else 224
            example = torch.randn(1, 3, size, size, device=next(model.parameters()).device)
            exported = torch.export.export(model.eval(), (example,), strict=False)
            calls = sum(node.op == "call_function" for node in exported.graph.nodes)
            return f"captured, {calls} ATen calls, no module kept whole"
        captured = capture(model, fallback=way == "both")
        return f"captured, {len(captured.opaque)} kept whole"
    except Exception as exc:  # the way's failure is its result
        return f"fails: {first_line(exc)}"


def measure(name: str, ways: tuple[str, ...]) -> dict[str, Any]:
    model = build(name)
    row: dict[str, Any] = {"model": name}
    for way in ways:
        started = time.monotonic()
        row[way] = attempt(way, model)
        row[f"{way}_s"] = round(time.monotonic() - started, 1)
    return row


def table(rows: list[dict[str, Any]], ways: tuple[str, ...]) -> str:
    lines = ["| model | " + " | ".join(ways) + " |", "| --- |" + " --- |" * len(ways)]
    lines += ["| " + " | ".join([row["model"], *(row[way] for way in ways)]) + " |" for row in rows]
    captured = {way: sum(row[way].startswith("captured") for row in rows) for way in ways}
    lines.append("| captured | " + " | ".join(f"{captured[way]} / {len(rows)}" for way in ways) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="", help="timm names, comma-separated (default: smallest of each module)")
    parser.add_argument("--candidates", type=int, default=4, help="names per module whose parameters are counted")
    parser.add_argument("--untraceable", action="store_true", help="keep only the models the plain way refuses")
    parser.add_argument("--export", action="store_true", help="also try torch.export (minutes per model on a CPU)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    ways = (*WAYS, "export") if args.export else WAYS
    names = [n for n in args.models.split(",") if n] or [e["model"] for e in smallest_models(args.candidates)]
    rows = []
    for name in names:
        row = measure(name, ways)
        if args.untraceable and row["plain"].startswith("captured"):
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, ways))
    return rows
