"""The one exception type pruneflow raises for input that cannot work, and that ``train.py`` and
``pruneflow-compact`` print as one line without a traceback.

Every other exception (a ``ZeroDivisionError``, a ``zip(strict=True)`` mismatch, a plain ``ValueError``
from PyTorch) is a bug somewhere and keeps its traceback. The data modules' ``DatasetNotFoundError``
and ``DatasetCorruptError``, ``NonFiniteLossError``, ``CompactionError`` and ``UnsupportedLightningError`` (a
Lightning without an internal that pruneflow reads, ``lightning_internal``) derive from it.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and what is accepted.

    A ``ValueError`` so that code catching bad values the standard way still catches it.
    """


def is_count(value: object) -> bool:
    """An ``int`` that is not a ``bool``: Python counts ``True`` as 1, a config's ``true`` is never a count."""
    return isinstance(value, int) and not isinstance(value, bool)


class UnsupportedLightningError(ConfigError):
    """The installed Lightning lacks an internal that pruneflow reads where Lightning offers no public API: the
    environment, not pruneflow, has to change, so it is printed as one line too."""


def lightning_internal(owner: object, path: str, needed_for: str) -> Any:
    """``owner.<path>`` (dotted), a part of Lightning it keeps private, read only where no public API gives it.

    Lightning may rename or drop it in any release: then this raises one line naming the Lightning version found
    and what needed it, rather than letting the caller fall back silently to a wrong default."""
    value, owner_name = owner, getattr(owner, "__name__", None) or type(owner).__name__  # a module or an object
    for attribute in path.split("."):
        try:
            value = getattr(value, attribute)
        except AttributeError:
            raise UnsupportedLightningError(
                f"{needed_for} reads Lightning's internal {owner_name}.{path}, which has no public "
                f"equivalent and is missing in the Lightning {lightning_version()} found; pruneflow supports "
                "lightning>=2.6,<3 (pip install 'lightning>=2.6,<3')"
            ) from None
    return value


def lightning_version() -> str:
    return importlib.metadata.version("lightning")
