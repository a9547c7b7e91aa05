"""pruneflow: channel pruning on PyTorch Lightning that measures whether pruned kernels stay pruned.

What a user imports into their own Lightning code lives here: the pruning callback and its strategies,
compaction, the models, the data modules and the measuring callbacks. Running experiments from the
command line (``train.py``) lives in ``pruneflow.experiment``.
"""

from pruneflow.callbacks import AccuracyCurve, NonFiniteLossGuard, TrainingThroughput
from pruneflow.errors import ConfigError
from pruneflow.module import ClassifierModule
from pruneflow.pruning import STRATEGIES, ChannelPruning, MaskStrategy, find_prunable_layers

__all__ = [
    "STRATEGIES",
    "AccuracyCurve",
    "ChannelPruning",
    "ClassifierModule",
    "ConfigError",
    "MaskStrategy",
    "NonFiniteLossGuard",
    "TrainingThroughput",
    "find_prunable_layers",
]
__version__ = "0.1.0"
