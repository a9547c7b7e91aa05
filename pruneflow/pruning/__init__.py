"""Channel pruning: the channel graph (channels), selection (criteria), masking (strategies), timing (schedule),
measurement (telemetry), and the Lightning Callback that ties them together (callback)."""

from pruneflow.pruning.callback import ChannelPruning
from pruneflow.pruning.channels import (
    ChannelGraph,
    ChannelSpace,
    Consumer,
    PrunableLayer,
    find_prunable_layers,
    trace_channel_graph,
)
from pruneflow.pruning.strategies import STRATEGIES, MaskStrategy

__all__ = [
    "STRATEGIES",
    "ChannelGraph",
    "ChannelPruning",
    "ChannelSpace",
    "Consumer",
    "MaskStrategy",
    "PrunableLayer",
    "find_prunable_layers",
    "trace_channel_graph",
]
