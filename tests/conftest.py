"""Shared fixtures: where the real data lies (helpers shared as plain functions live in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the real data (through the ``shared_data`` fixture) is ``slow``, as docs/testing.md says,
    whether or not it carries the mark: ``pytest -m "not slow"`` never touches ../shared/data."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def data_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded-split cache entries (pruneflow.data.tensor_cache) go to one folder per test session, never into
    the user's ~/.cache; runs of train.py started by tests inherit it through PRUNEFLOW_CACHE."""
    folder = tmp_path_factory.mktemp("data_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNEFLOW_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets folder; tests that need it skip (with the reason) where it is absent."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PRUNEFLOW_TEST_DATA to its folder)")
    return SHARED_DATA
