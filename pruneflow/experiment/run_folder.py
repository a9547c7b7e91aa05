"""Whether a run's folder was created by this start, and discarding it when the start fails before training.

Hydra creates the run folder, its ``.hydra/`` record and its log file before the task runs; a start refused
by a check would otherwise leave a folder per failed attempt beside the real runs. ``OutputFolderCheck`` (a
Hydra callback that runs before Hydra creates anything) notes whether the folder was there already: a folder
that existed before (``resume=true``, a reused ``hydra.run.dir``) is never discarded.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Folders noted before Hydra created them: the absolute path and whether it existed already.
_existed_before_start: dict[Path, bool] = {}


def note_before_start(run_dir: Path) -> None:
    """Note whether ``run_dir`` exists, before Hydra creates it."""
    _existed_before_start[run_dir.absolute()] = run_dir.exists()


def created_by_this_start(run_dir: Path) -> bool:
    """Whether Hydra created ``run_dir`` for this start (False where nobody noted it before the start)."""
    return _existed_before_start.get(run_dir.absolute()) is False


@contextmanager
def discarded_if_it_fails(run_dir: Path, discard: bool) -> Iterator[None]:
    """Remove ``run_dir`` when the block raises (and ``discard``); the error goes on."""
    try:
        yield
    except BaseException:
        if discard:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
