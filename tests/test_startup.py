"""A run records where its start-up went: every phase, in order, in the log and in metrics.json (no timing
is asserted: the phases' lengths depend on the machine)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers import compose_train

from pruneflow.experiment import startup
from pruneflow.experiment.run import train
from pruneflow.experiment.startup import PHASES, StartupPhases


def test_start_up_phases_are_recorded_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StartupPhases, "process_started_a_run", False, raising=False)  # the process's first run
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


def test_a_later_run_in_the_same_process_counts_no_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequential sweep runs its jobs in one process: the second job imported nothing, and the first job's
    time (a minute here) is not its start-up."""
    monkeypatch.setattr(startup, "seconds_since_process_start", lambda: 60.0)
    monkeypatch.setattr(StartupPhases, "process_started_a_run", False, raising=False)  # as in a fresh process
    first, second = StartupPhases(), StartupPhases()
    for run in (first, second):
        run.mark("imports")
    assert first.seconds["imports"] >= 60.0
    assert second.seconds["imports"] == 0.0
