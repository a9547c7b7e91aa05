"""How the reports write a cell: a metric's values over runs (finite numbers only) and their mean ± std."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Protocol


class HasMetrics(Protocol):
    metrics: dict


def values(runs: Sequence[HasMetrics], key: str) -> list[float]:
    found = [run.metrics.get(key) for run in runs]
    return [float(v) for v in found if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def fmt(found: list[float]) -> str:
    if not found:
        return "–"
    mean = statistics.fmean(found)
    if len(found) == 1:
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {statistics.stdev(found):.2g}"
