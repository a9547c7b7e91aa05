"""How errors reach the user of ``train.py`` and ``pruneflow-compact``: a ``ConfigError`` (ours, raised for
bad input) is shown as one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging

from pruneflow.errors import ConfigError


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error caused by user input, or ``None`` for a bug.

    Hydra wraps errors raised while instantiating a config in ``InstantiationException``, raised
    ``from`` the original: the ``ConfigError`` sits in the explicit ``__cause__`` chain. The implicit
    ``__context__`` is not followed: a bug raised while handling a ``ConfigError`` is still a bug.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConfigError):
            return " ".join(str(current).split())
        current = current.__cause__
    return None


def record_in_run_log(exc: BaseException, message: str | None) -> None:
    """Write why the run failed into its log file (Hydra's ``<run dir>/train.log``) only, as one ERROR line.

    The console shows the error once already (``SystemExit``'s line, or the traceback of a bug); the
    file keeps it beside the run, where ``pruneflow-report`` finds it for a failed run of a sweep
    whose console nobody saw (a Slurm job's).
    """
    line = f"pruneflow: error: {message}" if message else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    record = logging.LogRecord("pruneflow", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
