"""How errors reach the user of ``train.py``: the exceptions whose message is shown as one line, without a traceback."""

from __future__ import annotations

import logging

from hydra.errors import InstantiationException

# ArithmeticError: NonFiniteLossError, a diverged run (named step), not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ArithmeticError
)  # fmt: skip


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error caused by user input, or ``None`` for a bug.

    Hydra wraps errors raised while instantiating a config in ``InstantiationException``; the
    user-facing cause sits in its ``__cause__`` chain.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, USER_ERRORS) and not isinstance(current, InstantiationException):
            return " ".join(str(current).split())
        current = current.__cause__ or current.__context__
    return None


def record_in_run_log(exc: BaseException, message: str | None) -> None:
    """Write why the run failed into its log file (Hydra's ``<run dir>/train.log``) only, as one ERROR line.

    The console shows the error once already (``SystemExit``'s line, or the traceback of a bug); the
    file keeps it beside the run, where ``scripts/report.py`` finds it for a failed run of a sweep
    whose console nobody saw (a Slurm job's).
    """
    line = f"pruneflow: error: {message}" if message else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    record = logging.LogRecord("pruneflow", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
