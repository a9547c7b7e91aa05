"""Checkpoints a run can trust: written atomically, loaded without executing pickled code, checked
against the model before a resume touches anything."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from pruneflow.atomic_io import atomic_open
from pruneflow.errors import ConfigError

# A parametrized weight is stored as `<module>.parametrizations.<name>.original` (+ the mask's
# buffers); the model checked before `fit` has no parametrizations yet (ChannelPruning installs them
# at setup) and calls it `<module>.<name>`.
_PARAMETRIZED = re.compile(r"\.parametrizations\.(\w+)\.original$")
_PARAMETRIZATION_BUFFER = re.compile(r"\.parametrizations\.\w+\.\d+\.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target folder, fsyncs, then renames over the target.

    A SIGKILL at any moment leaves either the previous complete checkpoint or the new one, never a
    truncated file, so ``resume=true`` always finds a loadable ``last.ckpt``. Loads with
    ``weights_only=True``: our checkpoints hold only tensors, numbers and strings.
    """

    def __init__(self) -> None:
        super().__init__()
        self._preloaded: tuple[Path, dict[str, Any]] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_open(path, "wb") as handle:
            torch.save(checkpoint, handle)

    def preload(self, path: _PATH) -> dict[str, Any]:
        """Read ``path`` now, for the checks and mask restore a resume needs before ``fit``; the trainer's
        own restore then gets the same dict, so a resume reads the (possibly large) file once."""
        checkpoint = super().load_checkpoint(path, weights_only=True)
        self._preloaded = (Path(path).resolve(), checkpoint)
        return checkpoint

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if self._preloaded is not None and self._preloaded[0] == Path(path).resolve() and map_location is None:
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def plain_state_shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes by name, with parametrized weights under their plain names."""
    shapes = {}
    for key, value in state_dict.items():
        if _PARAMETRIZATION_BUFFER.search(key):
            continue
        shapes[_PARAMETRIZED.sub(r".\1", key)] = tuple(value.shape)
    return shapes


def check_checkpoint_matches(
    module: nn.Module, checkpoint_path: str | Path, checkpoint_io: AtomicCheckpointIO | None = None
) -> dict[str, Any]:
    """Load ``checkpoint_path`` (weights only; through ``checkpoint_io.preload`` if given, so the trainer
    reuses what was read) and refuse, in one line, one that belongs to another model."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass ckpt_path= an existing .ckpt file")
    try:
        if checkpoint_io is not None:
            checkpoint = checkpoint_io.preload(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load checkpoint {path} as plain tensors (weights_only=True): {exc}") from exc
    theirs = plain_state_shapes(checkpoint.get("state_dict", {}))
    ours = plain_state_shapes(module.state_dict())
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} comes from another model: it lacks {missing[:3]} and has {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected entries)"
        )
    # Written after a cut inside training (mask.cut_at_*): narrower tensors, which the pruning callback takes
    # the shape of before they load.
    cut = any(isinstance(state, dict) and state.get("cut") for state in (checkpoint.get("callbacks") or {}).values())
    for key, shape in ours.items():
        if theirs[key] != shape and not cut:
            raise ConfigError(
                f"checkpoint {path} comes from another model: {key} has shape {list(theirs[key])} there "
                f"and {list(shape)} here"
            )
    return checkpoint
