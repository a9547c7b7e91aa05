"""The exception pruneflow raises for input that cannot work: its message names the value and what is accepted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and what is accepted."""
