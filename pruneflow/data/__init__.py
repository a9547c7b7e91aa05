"""pruneflow's data sets: Lightning data modules over uint8 images held in memory.

``conf/data/<name>.yaml`` builds one of these with ``_target_``; the model reads ``input_shape`` and
``num_classes`` from it before ``setup``. Batches leave the loaders as uint8 and are normalised (and
augmented, for training) on the device in ``on_after_batch_transfer``.
"""

from pruneflow.data.base import (
    DatasetCorruptError,
    DatasetNotFoundError,
    InMemoryImageDataModule,
    TensorBatches,
    TorchvisionDataModule,
    split_indices,
)
from pruneflow.data.cifar10 import CIFAR10DataModule
from pruneflow.data.mnist import FashionMNISTDataModule, MNISTDataModule
from pruneflow.data.synthetic import SyntheticDataModule
from pruneflow.data.transforms import keyed_generator, normalize, random_crop_flip

__all__ = [
    "CIFAR10DataModule",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "FashionMNISTDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "TensorBatches",
    "TorchvisionDataModule",
    "keyed_generator",
    "normalize",
    "random_crop_flip",
    "split_indices",
]
