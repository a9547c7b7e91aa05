"""A run records where its start-up went: every phase, in order, in the log and in metrics.json (no timing
is asserted: the phases' lengths depend on the machine)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import compose_train

from pruneflow.experiment.run import train
from pruneflow.experiment.startup import PHASES


def test_start_up_phases_are_recorded_in_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_train("data=synthetic", "data.num_train=200", "data.num_test=32", "model.channels=[4,8]",
                        "trainer.max_epochs=1", "trainer.enable_model_summary=false", "~logger")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pruneflow.experiment.startup"):
        metrics = train(cfg, tmp_path)
    phases = [key.removeprefix("perf/startup/").removesuffix("_seconds") for key in metrics
              if key.startswith("perf/startup/")]  # fmt: skip
    assert sorted(phases, key=PHASES.index) == list(PHASES)
    seconds = [metrics[f"perf/startup/{phase}_seconds"] for phase in PHASES]
    assert all(value >= 0 for value in seconds) and metrics["perf/startup_seconds"] == pytest.approx(sum(seconds),
                                                                                                      abs=0.01)
    assert metrics["perf/startup/imports_seconds"] > 0, "the process start was not read"
    line = next(record.getMessage() for record in caplog.records if "start-up" in record.getMessage())
    positions = [line.index(f" {phase} ") for phase in PHASES]
    assert positions == sorted(positions), line
