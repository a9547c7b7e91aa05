"""Whether a run folder is this start's own, and discarding it when the start fails before training.

Hydra creates the run folder, its ``.hydra/`` record and its log file before the task runs; a start refused
by a check would otherwise leave a folder per failed attempt beside the real runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def holds_only_hydras_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes before the task starts (its ``.hydra/`` record
    and the job's ``<job name>.log``): a folder that held a run before (``resume=true``, a reused
    ``hydra.run.dir``) holds more."""
    return run_dir.is_dir() and all(entry.name == ".hydra" or entry.suffix == ".log" for entry in run_dir.iterdir())


@contextmanager
def discarded_if_it_fails(run_dir: Path, discard: bool) -> Iterator[None]:
    """Remove ``run_dir`` when the block raises (and ``discard``); the error goes on."""
    try:
        yield
    except BaseException:
        if discard:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
