"""Lightning callbacks and plugins that work with any LightningModule: measuring (throughput, accuracy
curve), guarding (non-finite loss) and crash-safe checkpoint writing."""

from pruneflow.callbacks.accuracy_curve import AccuracyCurve
from pruneflow.callbacks.checkpoint_io import AtomicCheckpointIO
from pruneflow.callbacks.non_finite_loss import NonFiniteLossError, NonFiniteLossGuard
from pruneflow.callbacks.throughput import TrainingThroughput

__all__ = ["AccuracyCurve", "AtomicCheckpointIO", "NonFiniteLossError", "NonFiniteLossGuard", "TrainingThroughput"]
