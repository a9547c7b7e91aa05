"""Shared fixtures: where the real data lies (helpers shared as plain functions live in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets folder; tests that need it skip (with the reason) where it is absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PRUNEFLOW_TEST_DATA to its folder)")
    return SHARED_DATA
