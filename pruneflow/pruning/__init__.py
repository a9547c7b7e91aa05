"""Channel pruning, reading the channel graph (``pruneflow.graph``): which spaces (selection), which channels
(criteria), masking (strategies), timing (schedule), measurement (telemetry), and the Lightning Callback (callback)
that wires its hooks to one object per job: plan, masking, telemetry_writer, live_cut."""

from pruneflow.graph import (
    ChannelGraph,
    ChannelSpace,
    Consumer,
    PrunableLayer,
    find_prunable_layers,
    trace_channel_graph,
)
from pruneflow.pruning.callback import ChannelPruning
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
