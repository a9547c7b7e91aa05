"""Shared test fixtures: where real data lies, and how to run the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI and developers keep the read-only real data sets beside the checkout, in ../shared/data.
SHARED_DATA = Path(os.environ.get("PRUNEFLOW_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the real data (through the ``shared_data`` fixture) is ``slow``, as the README says,
    whether or not it carries the mark: ``pytest -m "not slow"`` never touches ../shared/data."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets folder; tests that need it skip (with the reason) where it is absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PRUNEFLOW_TEST_DATA to its folder)")
    return SHARED_DATA


def run_train(*overrides: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python train.py <overrides>`` as a user would; never downloads (no PRUNEFLOW_DATA fallback)."""
    # tests/ on the path: a run can name test-only callbacks, e.g. +callbacks.probe._target_=helpers.ConsumerInputProbe
    python_path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
    env.pop("PRUNEFLOW_DATA", None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
PROBE = "+callbacks.consumer_probe._target_=helpers.ConsumerInputProbe"  # what consumers receive, into metrics.json
