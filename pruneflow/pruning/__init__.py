"""Channel pruning: topology (channels), selection (criteria), masking (strategies), timing (schedule),
measurement (telemetry), and the Lightning Callback that ties them together (callback)."""

from pruneflow.pruning.callback import ChannelPruning
from pruneflow.pruning.channels import Consumer, PrunableLayer, find_prunable_layers
from pruneflow.pruning.strategies import STRATEGIES, MaskStrategy

__all__ = ["STRATEGIES", "ChannelPruning", "Consumer", "MaskStrategy", "PrunableLayer", "find_prunable_layers"]
