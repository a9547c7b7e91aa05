"""pruneflow's benchmarks: one entry point, ``python -m benchmarks <subcommand>``, run from the repository root.

Not part of the installed library (the package build takes ``pruneflow*`` only): the benchmarks run
``train.py`` and read ``conf/`` of this checkout. Each subcommand is one module of this package that
defines ``add_arguments(parser)`` and ``run(args)``; only the chosen one is imported, so
``python -m benchmarks --help`` lists them all without importing torch. What they share
(running ``train.py`` as a user would, checking an arm before its speed counts, a measurement in a fresh process
under a time limit) is in ``benchmarks.common``; ``benchmarks.gpu_suite`` holds the sections of ``gpu --suite``,
and ``benchmarks.step_profile`` is a callback for ``train.py`` that profiles a window of steps.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from typing import Any

# subcommand → module; the module's docstring is its help
SUBCOMMANDS = {
    "overhead": "benchmarks.overhead",
    "host-overhead": "benchmarks.host_overhead",
    "startup": "benchmarks.startup",
    "data": "benchmarks.data",
    "callback": "benchmarks.callback",
    "cut-training": "benchmarks.cut_training",
    "channel-graph": "benchmarks.channel_graph",
    "timm": "benchmarks.timm_models",
    "capture": "benchmarks.capture",
    "gpu": "benchmarks.gpu",
    "gpu-section": "benchmarks.gpu_section",
    "defaults": "benchmarks.defaults",
    "time-to-accuracy": "benchmarks.time_to_accuracy",
    "outcome": "benchmarks.outcome",
}


def docstring(module: str) -> str:
    """A module's docstring read from its source, without importing it (and torch with it)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    with open(spec.origin, encoding="utf-8") as source:
        return ast.get_docstring(ast.parse(source.read())) or ""


def main(argv: list[str] | None = None) -> Any:
    """Parse ``<subcommand> [flags]`` and run that benchmark; returns what its ``run`` returns."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = parser.add_subparsers(dest="subcommand", metavar="<subcommand>", required=True)
    given = next((arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")), None)
    chosen = None
    for name, module in SUBCOMMANDS.items():
        text = docstring(module)
        summary = " ".join(text.split("\n\n")[0].split()).removeprefix("Benchmark: ")  # the first paragraph
        sub = commands.add_parser(name, help=summary, description=text,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        if name == given:  # only the chosen benchmark is imported: its flags, then its run
            chosen = importlib.import_module(module)
            chosen.add_arguments(sub)
    args = parser.parse_args(argv)
    args.command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)  # for the reports
    assert chosen is not None  # argparse has already refused an unknown subcommand
    return chosen.run(args)
