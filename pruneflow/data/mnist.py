"""MNIST and Fashion-MNIST: the 28×28 grey idx-file data sets that torchvision reads from ``root/<Name>/raw``.

Both are one class parameterised by torchvision's dataset class; Fashion-MNIST only changes the class
and the normalisation statistics. With ``download=false`` torchvision reads the raw folder directly
and writes nothing under ``root``.
"""

import math
import struct
from pathlib import Path

import torchvision
from torchvision.datasets.mnist import SN3_PASCALVINCENT_TYPEMAP

from pruneflow.data.base import Batch, DatasetCorruptError, TorchvisionDataModule, one_line


def idx_file_problem(path: Path) -> str | None:
    """Why an idx file cannot hold what its header promises, or None when its size agrees.

    torchvision's reader only fails with a tensor-shape error on a short file; this says which
    file it was and by how much it is off.
    """
    with path.open("rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in SN3_PASCALVINCENT_TYPEMAP or not magic[3]:
            return "not an idx file (bad magic number)"
        dims = f.read(4 * magic[3])
    if len(dims) < 4 * magic[3]:
        return "its header is cut short"
    item_size = SN3_PASCALVINCENT_TYPEMAP[magic[2]].itemsize
    promised = 4 + len(dims) + math.prod(struct.unpack(f">{magic[3]}I", dims)) * item_size
    size = path.stat().st_size
    if size != promised:
        return f"it has {size:,} bytes where its header promises {promised:,} (truncated or corrupt)"
    return None


class MNISTDataModule(TorchvisionDataModule):
    """MNIST handwritten digits: 60,000 training and 10,000 test images, 1×28×28, 10 classes."""

    dataset_class: type[torchvision.datasets.MNIST] = torchvision.datasets.MNIST
    name = "MNIST"
    input_shape = (1, 28, 28)
    num_classes = 10
    mean = (0.1307,)
    std = (0.3081,)

    @property
    def folder(self) -> Path:
        # torchvision's MNIST-family classes keep their files in root/<class name>/raw.
        return self.root / self.dataset_class.__name__ / "raw"

    @property
    def files(self) -> list[str]:
        """The unpacked idx files torchvision expects (it checks all four, whichever split it reads)."""
        return [Path(url).stem for url, _ in self.dataset_class.resources]

    def split_files(self, train: bool) -> list[str]:
        """The split's images and labels idx files."""
        return [name for name in self.files if name.startswith("train" if train else "t10k")]

    def source_files(self, train: bool) -> list[Path]:
        return [self.folder / name for name in self.split_files(train)]

    def read_split(self, train: bool) -> Batch:
        def diagnose(err: BaseException) -> DatasetCorruptError:
            split_files = self.split_files(train)
            for name in split_files:
                if problem := idx_file_problem(self.folder / name):
                    return DatasetCorruptError(
                        f"cannot read {self.folder.resolve() / name}: {problem}; delete it and pass "
                        "data.download=true to fetch a fresh copy"
                    )
            return DatasetCorruptError(
                f"cannot read {self.name} files {', '.join(split_files)} in {self.folder.resolve()}: {one_line(err)}"
            )

        dataset = self.read_with_torchvision(
            self.files, lambda: self.dataset_class(self.root, train=train, download=self.download), diagnose
        )
        return dataset.data.unsqueeze(1), dataset.targets


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST clothing images: MNIST's format and sizes, 10 garment classes."""

    dataset_class = torchvision.datasets.FashionMNIST
    name = "FashionMNIST"
    mean = (0.2860,)
    std = (0.3530,)
