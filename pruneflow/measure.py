"""Deprecated alias of ``pruneflow.callbacks`` (``pruneflow.measure.AccuracyCurve`` still works, with a warning)."""

from __future__ import annotations

import warnings

from pruneflow.callbacks.accuracy_curve import AccuracyCurve
from pruneflow.callbacks.throughput import TrainingThroughput

warnings.warn(
    "pruneflow.measure is renamed pruneflow.callbacks (e.g. pruneflow.callbacks.AccuracyCurve); "
    "the old name goes in the next release",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["AccuracyCurve", "TrainingThroughput"]
