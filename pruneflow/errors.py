"""The one exception type pruneflow raises for input that cannot work, and that ``train.py`` and
``pruneflow-compact`` print as one line without a traceback.

Every other exception (a ``ZeroDivisionError``, a ``zip(strict=True)`` mismatch, a plain ``ValueError``
from PyTorch) is a bug somewhere and keeps its traceback. The data modules' ``DatasetNotFoundError``
and ``DatasetCorruptError``, ``NonFiniteLossError`` and ``CompactionError`` derive from it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and what is accepted.

    A ``ValueError`` so that code catching bad values the standard way still catches it.
    """


def is_count(value: object) -> bool:
    """An ``int`` that is not a ``bool``: Python counts ``True`` as 1, a config's ``true`` is never a count."""
    return isinstance(value, int) and not isinstance(value, bool)
