"""pruneflow: channel pruning on PyTorch Lightning that measures whether pruned kernels stay pruned."""

from pruneflow.module import ClassifierModule
from pruneflow.pruning import STRATEGIES, ChannelPruning, MaskStrategy, find_prunable_layers

__all__ = ["STRATEGIES", "ChannelPruning", "ClassifierModule", "MaskStrategy", "find_prunable_layers"]
__version__ = "0.1.0"
