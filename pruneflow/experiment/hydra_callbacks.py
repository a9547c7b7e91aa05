"""Hydra callbacks that check a run's surroundings before Hydra writes anything.

Hydra creates the output folder before the task starts, so an unwritable one would otherwise fail
inside Hydra with a stack trace. Here it is one line naming the folder and the fix. The same callback notes
whether a single run's folder existed before (``run_folder``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pruneflow.experiment.run_folder import note_before_start


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (or in the nearest existing folder above it), or None."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} is not writable: {exc.strerror or exc}"
    return None


class OutputFolderCheck(Callback):
    """Stop before the run when its output folder (``hydra.run.dir`` / ``hydra.sweep.dir``) cannot be written."""

    def _check(self, folder: str, key: str) -> None:
        reason = unwritable_reason(Path(folder).absolute())
        if reason:
            fix = f"choose another with {key}="
            sys.exit(f"pruneflow: error: cannot write the output folder {folder} ({reason}); {fix}")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")
        note_before_start(Path(config.hydra.run.dir))  # a single run that fails before training removes its own

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
