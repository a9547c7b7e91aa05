"""Compaction: cut pruned channels out of a masked network, verify it, measure it, export it.

Masks are the means; a smaller, faster model is the end. ``cut`` builds the physically smaller network
(producer rows, BatchNorm entries and consumer columns removed, residual-coupled channels only when
their whole group is pruned), ``verify`` compares it with the masked model on test data, ``cost``
measures parameters, FLOPs and CPU latency before and after, ``export`` writes a ``torch.export``
program and a rebuildable state, ``from_checkpoint`` reloads a finished run, and ``pipeline`` ties them
together for ``compact=true`` runs and ``pruneflow-compact``.
"""

from pruneflow.compaction.cut import ChannelGroup, Compaction, CompactionError, compact, effective_copy, plan_cut
from pruneflow.compaction.export import export_compact, load_compact, load_exported
from pruneflow.compaction.from_checkpoint import TrainedRun, load_trained_run
from pruneflow.compaction.pipeline import compact_and_verify, compact_trained_module, test_batches
from pruneflow.compaction.verify import Verification, verify

__all__ = [
    "ChannelGroup",
    "Compaction",
    "CompactionError",
    "TrainedRun",
    "Verification",
    "compact",
    "compact_and_verify",
    "compact_trained_module",
    "effective_copy",
    "export_compact",
    "load_compact",
    "load_exported",
    "load_trained_run",
    "plan_cut",
    "test_batches",
    "verify",
]
