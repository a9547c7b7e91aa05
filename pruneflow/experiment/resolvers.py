"""The OmegaConf resolvers ``conf/`` uses, registered when ``pruneflow.experiment`` is imported (``train.py``
imports it before Hydra composes a config)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf


def concat(*lists: Iterable[Any]) -> list[Any]:
    """``${pruneflow.concat:${a},[b]}``: one list of the items of each, so a list is defined once and extended."""
    return [item for items in lists for item in items]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pruneflow.concat"):
        OmegaConf.register_new_resolver("pruneflow.concat", concat)
