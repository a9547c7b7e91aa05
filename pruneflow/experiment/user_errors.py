"""How errors reach the user of ``train.py`` and ``scripts/compact.py``: a ``ConfigError`` (ours, raised for
bad input) is shown as one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations

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
