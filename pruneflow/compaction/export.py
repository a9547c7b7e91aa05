"""Export of a compacted model: a ``torch.export`` program that loads without pruneflow, and a state to rebuild it.

A compaction folder holds

    model.pt2           ``torch.export`` program (batch dimension dynamic); load it with
                        ``torch.export.load(path).module()`` — torch only, no pruneflow, no model code
    compact_state.pt    ``{"state_dict", "model", "sizes", "removed", "input_shape"}``: the weights, the
                        original architecture's config (Hydra ``_target_`` + arguments), the widths of
                        every rebuilt module and the channels cut; ``load_compact`` rebuilds an
                        ``nn.Module`` of the original class from it (for fine-tuning, or further cuts)

TorchScript is not written: ``torch.jit`` is deprecated in favour of ``torch.export``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from pruneflow.compaction.cut import Compaction, apply_sizes
from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

EXPORTED_PROGRAM = "model.pt2"
COMPACT_STATE = "compact_state.pt"
STATE_FORMAT = 1


def export_compact(
    compaction: Compaction,
    input_shape: tuple[int, ...],
    folder: str | os.PathLike[str],
    model_config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``model.pt2`` and ``compact_state.pt`` for the compacted model into ``folder``.

    ``model_config`` (``_target_`` and constructor arguments of the *original* model) lets
    ``load_compact`` rebuild it; without it only the exported program can be loaded back.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(compaction.model).cpu().eval()
    # Two images: torch.export specialises a dimension whose example size is 1.
    example = torch.randn(2, *input_shape)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    paths = {"program": folder / EXPORTED_PROGRAM, "state": folder / COMPACT_STATE}
    torch.export.save(program, paths["program"])
    torch.save(
        {
            "format": STATE_FORMAT,
            "state_dict": model.state_dict(),
            "model": None if model_config is None else _plain(model_config),
            "sizes": compaction.sizes,
            "removed": compaction.removed,
            "input_shape": list(input_shape),
        },
        paths["state"],
    )
    log.info("compacted model exported to %s", folder)
    return paths


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain dicts, lists and scalars, so ``torch.load(weights_only=True)`` can read it back."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(key): convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ConfigError(f"model config entry {value!r} is a {type(value).__name__}; only plain values can be saved")

    if "_target_" not in config:
        raise ConfigError(f"the model config needs a _target_ naming the model class, got keys {sorted(config)}")
    return convert(config)


def load_compact(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compacted model from ``compact_state.pt``: the original class, resized, with its weights."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path} is not a pruneflow compact state (format {STATE_FORMAT})")
    if payload["model"] is None:
        raise ConfigError(
            f"{path} was saved without the model's config; load {EXPORTED_PROGRAM} with torch.export.load instead"
        )
    model = apply_sizes(instantiate(payload["model"]), payload["sizes"])
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()


def load_exported(path: str | os.PathLike[str]) -> nn.Module:
    """The exported program as a callable module (what a deployment without pruneflow does)."""
    return torch.export.load(path).module()
