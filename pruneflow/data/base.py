"""The in-memory data module every pruneflow data set is: uint8 tensors, seeded splits, batch transforms.

A data set subclass only says how to read its two splits as (N, C, H, W) uint8 images and int64
labels (``read_split``) and gives its ``input_shape``, ``num_classes`` and normalisation statistics.
Everything else lives here once: the fixed validation split, ``limit_train``, the batch iterator
(shuffling per epoch, sharding by rank), and normalisation/augmentation of whole batches on the
device in ``on_after_batch_transfer``; on an accelerator the uint8 tensors themselves move to it once,
so batches are cut, augmented and normalised there with no per-batch host copy. The sanity check's
validation batches are cut to ``batch_size`` images there: it runs the code, its figures are discarded.
``TorchvisionDataModule`` adds what data sets read from files under ``root`` share:
``download``, the one-line errors for missing or unreadable files, and the decoded-split cache
(``pruneflow.data.tensor_cache``) that spares later runs the decoding.
"""

import logging
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from pruneflow.data.tensor_cache import SplitCache, default_cache_dir
from pruneflow.data.transforms import keyed_generator, normalize, random_crop_flip
from pruneflow.errors import ConfigError, lightning_internal

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
_Read = TypeVar("_Read")

# What torchvision's readers raise on a bad file: asserts on idx headers, tensor view errors on a short
# buffer, unpickling errors, OS errors; ours wraps them into one line that names the file.
READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    TypeError,
    AssertionError,
    EOFError,
    KeyError,
    IndexError,
    pickle.UnpicklingError,
)


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """A data set's files are not where we looked, and download was off or failed."""


class DatasetCorruptError(ConfigError):
    """A data set's files are there but cannot be read: truncated, corrupted, or failing a checksum."""


def one_line(err: BaseException) -> str:
    """An exception's message with its newlines folded, so our errors stay one line."""
    return " ".join(str(err).split()) or type(err).__name__


@rank_zero_only
def log_once(logger: logging.Logger, message: str, *args: Any) -> None:
    """Log on global rank zero only, so a DDP run reports its data once."""
    logger.info(message, *args)


def split_indices(num_images: int, num_val: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices of a seeded random split; depends on ``split_seed`` and the sizes only."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(split_seed))
    return order[num_val:], order[:num_val]


class TensorBatches:
    """Re-iterable ``(images, labels)`` batches cut from in-memory tensors by indexing.

    With ``shuffle`` each ``__iter__`` draws its order from ``torch.Generator().manual_seed(seed +
    epoch())``, with ``epoch()`` read at that moment: epoch k has the same order in a fresh run and
    in a run resumed at epoch k. With ``world_size > 1`` rank r takes every world_size-th index of
    that order starting at r, after dropping the remainder so that all ranks run the same number of
    steps (Lightning shards DataLoaders itself, but not custom iterables like this one).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels; they must match")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got {rank=}, {world_size=}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = epoch if epoch is not None else (lambda: 0)
        self.rank, self.world_size = rank, world_size

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch."""
        return len(self.images) // self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> Tensor | None:
        """This rank's sample order for the current epoch; None means ``0..N-1`` in order, unsharded."""
        if not self.shuffle and self.world_size == 1:
            return None
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch()))
        else:
            order = torch.arange(n)
        return order[: n - n % self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        order = self.indices()
        if order is not None:
            order = order.to(self.images.device)  # one copy per epoch when the images sit on a GPU
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:  # evaluation: contiguous slices are views, nothing is copied
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                batch = order[start : start + self.batch_size]
                # index_select, not images[batch]: the same gather, many times faster for uint8 on CPU.
                yield self.images.index_select(0, batch), self.labels.index_select(0, batch)


class InMemoryImageDataModule(L.LightningDataModule):
    """An image-classification data set held as uint8 tensors, batched by indexing.

    Args:
        batch_size: training batch size (per rank).
        eval_batch_size: validation/test batch size.
        val_size: the validation split carved from the official training set, fixed by
            ``split_seed``: an int is a count of images, a float in [0, 1) a fraction of them.
            0 gives no validation set.
        split_seed: seed of that split; independent of ``seed`` so runs with different seeds are
            validated on the same images.
        limit_train: keep only this many (randomly chosen, by ``split_seed``) training images
            after the split; None keeps all.
        seed: the run seed: training order per epoch and the augmentation of every batch derive
            from it, the epoch and the batch index.
        augment: random crop (zero padding ``crop_padding``) + horizontal flip of training
            batches; None takes the data set's default (``augment_by_default``).
        drop_last: drop the last incomplete training batch.
        on_device: keep the uint8 tensors on the trainer's device (copied there once; MNIST is 55 MB,
            the full CIFAR-10 180 MB) so batches never cross the host bus. None: on an accelerator,
            not on CPU (where they are there already).

    Validation and test batches are not sharded: under DDP every rank evaluates the whole split,
    so metrics are exact without padding duplicates.
    """

    name: str = "images"
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment_by_default: bool = False
    crop_padding: int = 4

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int | float = 0.1,
        split_seed: int = 0,
        limit_train: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        drop_last: bool = False,
        on_device: bool | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{arg} must be a positive int, got {value!r}")
        for arg, value in (("split_seed", split_seed), ("seed", seed)):
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{arg} must be an int >= 0, got {value!r}")
        if not (_is_int(val_size) and val_size >= 0) and not (isinstance(val_size, float) and 0 <= val_size < 1):
            raise ConfigError(f"val_size must be an int count >= 0 or a float fraction in [0, 1), got {val_size!r}")
        if limit_train is not None and (not _is_int(limit_train) or limit_train <= 0):
            raise ConfigError(f"limit_train must be a positive int or None, got {limit_train!r}")
        if augment is not None and not isinstance(augment, bool):
            raise ConfigError(f"augment must be true, false or null (the data set's default), got {augment!r}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.limit_train = val_size, split_seed, limit_train
        self.seed, self.drop_last = seed, bool(drop_last)
        self.augment = self.augment_by_default if augment is None else augment
        if on_device is not None and not isinstance(on_device, bool):
            raise ConfigError(f"on_device must be true, false or null (on an accelerator), got {on_device!r}")
        self.on_device = on_device
        self._device_copies: dict[tuple[str, torch.device], Batch] = {}
        self.train_images: Tensor | None = None
        self.train_labels: Tensor | None = None
        self.val_images: Tensor | None = None
        self.val_labels: Tensor | None = None
        self.test_images: Tensor | None = None
        self.test_labels: Tensor | None = None
        self._stats_on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def read_split(self, train: bool) -> Batch:
        """The official training (``train``) or test split: uint8 (N, C, H, W) images, int64 labels."""
        raise NotImplementedError

    def load_split(self, train: bool) -> Batch:
        """``read_split``, or where a subclass caches splits, the cached copy of what it would read."""
        return self.read_split(train)

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:  # read once, whatever the number of stages
            return
        train_images, train_labels = self._checked(*self.load_split(train=True), split="training")
        self.test_images, self.test_labels = self._checked(*self.load_split(train=False), split="test")
        num_val = self.num_val(len(train_images))
        train_index, val_index = split_indices(len(train_images), num_val, self.split_seed)
        if self.limit_train is not None:
            if self.limit_train > len(train_index):
                raise ConfigError(
                    f"limit_train={self.limit_train} exceeds the {len(train_index):,} {self.name} training "
                    f"images left after the validation split; use at most {len(train_index):,} or null"
                )
            train_index = train_index[: self.limit_train]
        # Sorted, so the tensors keep the files' order (the split itself is random).
        train_index, val_index = train_index.sort().values, val_index.sort().values
        self.train_images, self.train_labels = train_images[train_index], train_labels[train_index]
        self.val_images, self.val_labels = train_images[val_index], train_labels[val_index]
        megabytes = sum(t.nbytes for t in (self.train_images, self.val_images, self.test_images)) / 2**20
        log_once(
            log,
            "%s: %s train / %s val / %s test images of shape %s in memory as uint8 (%.0f MB)",
            self.name, f"{len(self.train_images):,}", f"{len(self.val_images):,}",
            f"{len(self.test_images):,}", self.input_shape, megabytes,
        )  # fmt: skip

    def num_val(self, num_images: int) -> int:
        """Validation images carved from ``num_images`` training images, checked against it."""
        count = round(self.val_size * num_images) if isinstance(self.val_size, float) else self.val_size
        if count >= num_images:
            raise ConfigError(
                f"val_size={self.val_size} takes {count:,} of the {num_images:,} {self.name} training images "
                "and leaves none to train on; use a smaller count or fraction"
            )
        return count

    def _checked(self, images: Tensor, labels: Tensor, split: str) -> Batch:
        expected = (len(images), *self.input_shape)
        if images.dtype != torch.uint8 or tuple(images.shape) != expected:
            raise DatasetCorruptError(
                f"{self.name} {split} images are {images.dtype} of shape {tuple(images.shape)}, "
                f"expected torch.uint8 of shape {expected}"
            )
        if len(labels) != len(images) or (len(labels) and not 0 <= labels.min() <= labels.max() < self.num_classes):
            raise DatasetCorruptError(
                f"{self.name} {split} split has {len(images):,} images and {len(labels):,} labels "
                f"(expected as many, each in [0, {self.num_classes}))"
            )
        return images.contiguous(), labels.to(torch.int64)

    def _require_setup(self) -> None:
        if self.train_images is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are asked for")

    def _placed(self, split: str, images: Tensor, labels: Tensor) -> Batch:
        """``(images, labels)`` on the trainer's device when ``on_device`` says so (copied once per device)."""
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", torch.device("cpu"))
        wanted = self.on_device if self.on_device is not None else device.type != "cpu"
        if not wanted or device.type == "cpu":
            return images, labels
        key = (split, device)
        if key not in self._device_copies:
            self._device_copies[key] = (images.to(device), labels.to(device))
        return self._device_copies[key]

    def train_dataloader(self) -> TensorBatches:
        self._require_setup()
        trainer = self.trainer
        return TensorBatches(
            *self._placed("train", self.train_images, self.train_labels),
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            epoch=lambda: self.trainer.current_epoch if self.trainer is not None else 0,
            drop_last=self.drop_last,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )

    def val_dataloader(self) -> TensorBatches:
        self._require_setup()
        return TensorBatches(*self._placed("val", self.val_images, self.val_labels), self.eval_batch_size)

    def test_dataloader(self) -> TensorBatches:
        self._require_setup()
        return TensorBatches(*self._placed("test", self.test_images, self.test_labels), self.eval_batch_size)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            if trainer is not None and trainer.sanity_checking:
                # The sanity check runs the validation code before the first step, and its figures are
                # discarded: a training batch's worth of images runs that code as well as 1,000 do.
                batch = batch[0][: self.batch_size], batch[1][: self.batch_size]
            return self.transform_batch(batch, train=False)
        # Lightning runs this hook just before it counts the batch as ready, so `ready` is this batch's
        # index within the epoch; it is restored from checkpoints, which keeps augmentation resume-safe. The
        # hook is not given the index, and the loop's progress has no public reader.
        batch_idx = lightning_internal(
            trainer, "fit_loop.epoch_loop.batch_progress.current.ready", "resume-safe augmentation"
        )
        return self.transform_batch(
            batch, train=True, epoch=trainer.current_epoch, batch_idx=batch_idx, rank=trainer.global_rank
        )

    def transform_batch(self, batch: Batch, *, train: bool, epoch: int = 0, batch_idx: int = 0, rank: int = 0) -> Batch:
        """uint8 batch → normalised float32 batch, augmented first when ``train`` and ``augment``.

        The augmentation is a function of (seed, epoch, batch_idx, rank) only; the rank keeps DDP
        ranks from cropping their different images with the same offsets.
        """
        images, labels = batch
        if train and self.augment:
            generator = keyed_generator(self.seed, epoch, batch_idx, rank, device=images.device)
            images = random_crop_flip(images, self.crop_padding, generator)
        if images.device not in self._stats_on:  # so a GPU gets its mean/std once, not every batch
            self._stats_on[images.device] = (
                torch.tensor(self.mean, device=images.device),
                torch.tensor(self.std, device=images.device),
            )
        return normalize(images, *self._stats_on[images.device]), labels


class TorchvisionDataModule(InMemoryImageDataModule):
    """A data set read from files under ``root`` by torchvision, which also downloads them on request.

    Args:
        root: the folder torchvision's dataset class takes as ``root``.
        download: let torchvision fetch the files when they are absent. Off by default, so a wrong
            ``root`` is an error naming the folder rather than a silent download.
        cache: keep each decoded split as a tensor file and map it in later runs
            (``pruneflow.data.tensor_cache``: keyed by the source files' size, mtime and inode).
        cache_dir: where those files go; None: ``$PRUNEFLOW_CACHE``, else ``$XDG_CACHE_HOME/pruneflow/data``
            (``~/.cache/pruneflow/data``).
        **kwargs: see ``InMemoryImageDataModule``.
    """

    def __init__(
        self,
        root: str | Path = "./data",
        download: bool = False,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(download, bool):
            raise ConfigError(f"download must be true or false, got {download!r}")
        if not isinstance(cache, bool):
            raise ConfigError(f"cache must be true or false, got {cache!r}")
        if cache_dir is not None and not isinstance(cache_dir, str | Path):
            raise ConfigError(f"cache_dir must be a folder path or null (the default cache folder), got {cache_dir!r}")
        self.root = Path(root).expanduser()
        self.download = download
        self.cache = cache
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None

    def source_files(self, train: bool) -> list[Path]:
        """The files a split is decoded from: its cache entry is current while they are unchanged."""
        raise NotImplementedError

    def read_settings(self) -> dict[str, Any]:
        """Reader options that change the decoded tensors (beyond the source files); part of the cache key."""
        return {}

    def load_split(self, train: bool) -> Batch:
        sources = self.source_files(train)
        if not self.cache or not sources or not all(path.is_file() for path in sources):
            return self.read_split(train)  # the reader says what is missing (or fetches it)
        settings = {"folder": str(self.folder.resolve()), **self.read_settings()}
        cache = SplitCache(self.cache_dir or default_cache_dir(), self.name, "train" if train else "test",
                           settings, sources)  # fmt: skip
        return cache.load_or_read(lambda: self.read_split(train))

    @property
    def folder(self) -> Path:
        """Where the data set's files lie under ``root``."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before `setup`: downloading here means ranks
        # never fetch into the same folder at once; `setup` then finds the files.
        if self.download:
            self.read_split(train=True)
            self.read_split(train=False)

    def missing(self, expected: Sequence[str]) -> list[str]:
        return [name for name in expected if not (self.folder / name).is_file()]

    def not_found(self, expected: Sequence[str], missing: Sequence[str]) -> DatasetNotFoundError:
        which = "all missing" if len(missing) == len(expected) else "missing " + ", ".join(missing)
        return DatasetNotFoundError(
            f"{self.name} not found in {self.folder.resolve()}: expected {', '.join(expected)} ({which}); "
            f"fix: pass data.download=true to fetch it, or set data.root=<folder> (or the PRUNEFLOW_DATA "
            f"environment variable) to the folder that holds {self.folder.relative_to(self.root).as_posix()}/"
        )

    def download_failed(self, err: BaseException) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"could not download {self.name} into {self.folder.resolve()}: {one_line(err)}; fix: check the "
            f"internet connection, or copy the files there and pass data.download=false (or set data.root / "
            f"PRUNEFLOW_DATA to a folder that has them)"
        )

    def read_with_torchvision(
        self,
        expected: Sequence[str],
        read: Callable[[], _Read],
        diagnose: Callable[[BaseException], DatasetCorruptError],
    ) -> _Read:
        """Run torchvision's reader (and downloader) with its failures turned into one-line errors.

        ``expected`` are the files under ``folder`` that must exist (unless downloading);
        ``diagnose`` names the unreadable file when torchvision fails on files that are all there.
        """
        missing = self.missing(expected)
        if missing and not self.download:
            raise self.not_found(expected, missing)
        try:
            return read()
        except READ_ERRORS as err:
            if self.download and self.missing(expected):  # still absent: torchvision's fetch failed
                raise self.download_failed(err) from err
            raise diagnose(err) from err


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
