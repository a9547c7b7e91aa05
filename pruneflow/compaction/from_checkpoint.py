"""A finished run, reloaded for compaction: its config, its network with the masks as trained, its test data.

The network is rebuilt from ``<run dir>/config.yaml`` and its weights come from a checkpoint. The masks
come from the ``ChannelPruning`` state in the checkpoint (``checkpoint["callbacks"][...]["pruned"]``:
boolean masks, or lists of pruned channel indices); the run's strategy installs its machinery on every
layer the run selected (``layers``), pruned or not yet, before the weights load, as the callback's
``setup`` does: an ``activation`` mask's hooks, a ``parametrize`` mask's parametrization (whose stored
weight the checkpoint holds) — so a checkpoint written before pruning loads too. Strategies that act
only during training (``weight``, ``gradient``, ``hard``, ``control``) install nothing: their network
is the weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from pruneflow.compaction.cut import apply_sizes, as_mask
from pruneflow.compaction.pipeline import model_config
from pruneflow.errors import ConfigError
from pruneflow.graph import PrunableLayer, find_prunable_layers
from pruneflow.pruning.strategies import current_strategy_name, make_strategy

log = logging.getLogger(__name__)

# ClassifierModule keeps the network as `model`: its weights are `model.*` in the Lightning state dict.
NETWORK_PREFIX = "model."


@dataclass
class TrainedRun:
    """A run's network as trained (masks in effect), its masks and strategy, and its data; ``layers``: the
    network's producers as the channel graph read it before the masks were installed (empty after a cut while
    training, whose network no longer has the traced widths)."""

    network: nn.Module
    pruned: dict[str, Tensor]
    strategy: str
    model_config: dict[str, Any]
    datamodule: L.LightningDataModule
    checkpoint: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    layers: list[PrunableLayer] = field(default_factory=list)


def pruning_state(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The ``ChannelPruning`` entry of a Lightning checkpoint's callback states."""
    states = [state for state in (checkpoint.get("callbacks") or {}).values() if isinstance(state, Mapping)]
    states = [state for state in states if "pruned" in state]
    if len(states) != 1:
        raise ConfigError(
            f"checkpoint {path} holds {len(states)} ChannelPruning mask states, expected 1: it comes from a run "
            "without mask=<strategy>, or from a pruneflow that did not save masks; compact such a run with "
            "compact=true at the end of training instead"
        )
    return states[0]


def load_trained_run(
    run_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> TrainedRun:
    """Rebuild ``run_dir``'s network from ``checkpoint`` (default ``checkpoints/last.ckpt``) with its masks.

    ``data_root`` replaces the config's ``data.root`` (a relative root resolves against the working
    folder, which may not be the one the run was started from).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no config.yaml")
    path = Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    cfg = OmegaConf.load(config_path)
    if data_root is not None:
        cfg.data.root = str(data_root)
    datamodule = instantiate(cfg.data)
    config = model_config(cfg.model, datamodule)
    network = instantiate(config)

    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = pruning_state(saved, path)
    strategy_name = str(state.get("strategy") or OmegaConf.select(cfg, "mask.strategy"))
    strategy_name = current_strategy_name(strategy_name, warn=False)
    layers = {layer.name: layer for layer in find_prunable_layers(network)}
    pruned: dict[str, Tensor] = {}
    strategy = make_strategy(strategy_name)
    if state.get("cut"):  # cut while training (mask.cut_at_*): the weights are the smaller network's, unmasked
        apply_sizes(network, state["cut_sizes"])
    # Checkpoints from before `layers` was saved name only the pruned layers.
    for name in [] if state.get("cut") else (state.get("layers") or state["pruned"]):
        if name not in layers:
            raise ConfigError(f"checkpoint {path} masks {name!r}, which is not a prunable conv of {config['_target_']}")
        strategy.prepare(layers[name])  # before the weights: parametrized keys must exist
        if name in state["pruned"]:
            pruned[name] = as_mask(name, state["pruned"][name], layers[name].num_channels)
            strategy.install(layers[name], pruned[name])
    weights = {
        key[len(NETWORK_PREFIX) :]: value
        for key, value in saved["state_dict"].items()
        if key.startswith(NETWORK_PREFIX)
    }
    if not weights:
        raise ConfigError(f"checkpoint {path} holds no {NETWORK_PREFIX}* weights; it is not a ClassifierModule's")
    network.load_state_dict(weights)
    network.eval()
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    log.info("loaded %s (mask=%s, %d pruned channels)", path, strategy_name, sum(int(m.sum()) for m in pruned.values()))
    traced = [] if state.get("cut") else list(layers.values())
    return TrainedRun(network, pruned, strategy_name, config, datamodule, path, metrics, traced)
