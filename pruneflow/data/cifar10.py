"""CIFAR-10: 32×32 colour images from ``root/cifar-10-batches-py``, checked by torchvision or read as found.

``verify=true`` (the default) goes through ``torchvision.datasets.CIFAR10``, which md5-checks all six
batch files and downloads on request. ``verify=false`` reads the python-pickle batches directly and
accepts a folder holding only some of ``data_batch_1..5`` (plus ``test_batch``), saying how many
images it found: subsets, partial copies and modified batches train without a checksum to match.
Either way the decoded splits are cached (``pruneflow.data.tensor_cache``); a cached split is not
md5-checked again while its files keep their size, modification time and inode.
"""

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from pruneflow.data.base import READ_ERRORS, Batch, DatasetCorruptError, TorchvisionDataModule, log_once, one_line
from pruneflow.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_BATCHES = [name for name, _ in CIFAR10.train_list]
TEST_BATCH = CIFAR10.test_list[0][0]
CHECKSUMS = dict(CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, 3×32×32, 10 classes; augmented by default.

    Args:
        verify: read through torchvision with its md5 check (true), or read whichever batch files
            are present without checking them (false); see the module docstring.
        **kwargs: see ``TorchvisionDataModule`` and ``InMemoryImageDataModule``.

    After ``setup``, ``images_found`` holds the number of training and test images read and
    ``batches_found`` the training batch files they came from.
    """

    name = "CIFAR-10"
    input_shape = (3, 32, 32)
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    augment_by_default = True

    def __init__(self, root: str | Path = "./data", download: bool = False, verify: bool = True, **kwargs: Any):
        super().__init__(root=root, download=download, **kwargs)
        if not isinstance(verify, bool):
            raise ConfigError(f"verify must be true or false, got {verify!r}")
        self.verify = verify
        self.images_found: dict[str, int] = {}
        self.batches_found: list[str] = []

    @property
    def folder(self) -> Path:
        return self.root / CIFAR10.base_folder

    def source_files(self, train: bool) -> list[Path]:
        if self.verify:  # torchvision reads (and md5-checks) all of them, whichever split
            return [self.folder / name for name in CHECKSUMS]
        names = TRAIN_BATCHES if train else [TEST_BATCH]
        return [self.folder / name for name in names if (self.folder / name).is_file()]

    def read_settings(self) -> dict[str, Any]:
        return {"verify": self.verify}

    def read_split(self, train: bool) -> Batch:
        return self._read_verified(train) if self.verify else self._read_found(train)

    def load_split(self, train: bool) -> Batch:
        images, labels = super().load_split(train)
        self.images_found["train" if train else "test"] = len(images)
        if self.verify:
            if train:
                self.batches_found = list(TRAIN_BATCHES)
            return images, labels
        found = [path.name for path in self.source_files(train)]  # what read_split read, or the cache was keyed on
        if train:
            self.batches_found = found
            log_once(
                log,
                "CIFAR-10: read %s training images from %d of %d batches (%s) in %s",
                f"{len(images):,}", len(found), len(TRAIN_BATCHES), ", ".join(found), self.folder.resolve(),
            )  # fmt: skip
        else:
            log_once(
                log, "CIFAR-10: read %s test images (%s) in %s", f"{len(images):,}", found[0], self.folder.resolve()
            )
        return images, labels

    def _read_verified(self, train: bool) -> Batch:
        expected = list(CHECKSUMS)
        missing = self.missing(expected)
        if missing and len(missing) < len(expected) and not self.download:
            # Torchvision would refuse a partial folder with "not found or corrupted"; say how to read it.
            raise self._failed_checksum()
        dataset = self.read_with_torchvision(
            expected,
            lambda: CIFAR10(self.root, train=train, download=self.download),
            lambda err: self._failed_checksum(),
        )
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # torchvision keeps HWC for PIL
        return images.contiguous(), torch.tensor(dataset.targets, dtype=torch.int64)

    def _failed_checksum(self) -> DatasetCorruptError:
        problems = [
            f"{name} {'missing' if not (self.folder / name).is_file() else 'differs'}"
            for name, md5 in CHECKSUMS.items()
            if not check_integrity(str(self.folder / name), md5)
        ]
        return DatasetCorruptError(
            f"CIFAR-10 in {self.folder.resolve()} fails torchvision's md5 check ({', '.join(problems)}); "
            "pass data.verify=false to read a partial or modified cifar-10-batches-py folder as it is, "
            "or data.download=true to fetch the full set"
        )

    def _read_found(self, train: bool) -> Batch:
        names = TRAIN_BATCHES if train else [TEST_BATCH]
        if self.download and len(self.missing(names)) == len(names):
            # Nothing to read yet: let torchvision fetch (and check) the full set first.
            self.read_with_torchvision(
                names, lambda: CIFAR10(self.root, train=train, download=True), lambda err: self._failed_checksum()
            )
        found = [name for name in names if (self.folder / name).is_file()]
        if not found:
            raise self.not_found(names, names)
        batches = [self._read_batch(self.folder / name) for name in found]
        images = torch.from_numpy(np.concatenate([images for images, _ in batches]))
        labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
        return images, labels

    @staticmethod
    def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One pickled batch: a dict with "data" (N, 3072) uint8 rows (R, G, B planes) and "labels"."""
        try:
            with path.open("rb") as f:
                # latin1 as torchvision does: the official files are Python 2 pickles of numpy arrays.
                entry = pickle.load(f, encoding="latin1")
            entry = {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}
            data, labels = entry["data"], np.asarray(entry["labels"], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(
                    f"holds {data.dtype} data of shape {data.shape} and {len(labels)} labels, "
                    "expected uint8 (N, 3072) and N labels"
                )
        except (*READ_ERRORS, AttributeError) as err:
            raise DatasetCorruptError(f"cannot read CIFAR-10 batch {path.resolve()}: {one_line(err)}") from err
        return data.reshape(-1, 3, 32, 32), labels
