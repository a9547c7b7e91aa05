"""The OmegaConf resolvers ``conf/`` uses, registered when ``pruneflow.experiment`` is imported (``train.py``
imports it before Hydra composes a config)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import omegaconf
from omegaconf import OmegaConf


def concat(*lists: Iterable[Any]) -> list[Any]:
    """``${pruneflow.concat:${a},[b]}``: one list of the items of each, so a list is defined once and extended."""
    return [item for items in lists for item in items]


def register_resolvers() -> None:
    if OmegaConf.has_resolver("pruneflow.concat"):
        return
    # OmegaConf 2.4 renamed register_new_resolver (deprecated there) to register_resolver, which in 2.3 is the
    # legacy string-only API; Hydra 1.3 admits both versions.
    if tuple(int(part) for part in omegaconf.__version__.split(".")[:2]) >= (2, 4):
        OmegaConf.register_resolver("pruneflow.concat", concat)
    else:
        OmegaConf.register_new_resolver("pruneflow.concat", concat)
