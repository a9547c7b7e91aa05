"""Tests of pruneflow.data: in-memory data modules, batch iterators, batch transforms and their errors."""

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torchvision
from helpers import SHARED_DATA
from torch import nn

from pruneflow.data import (
    CIFAR10DataModule,
    DatasetCorruptError,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    TensorBatches,
    keyed_generator,
    normalize,
    random_crop_flip,
    split_indices,
)

CIFAR_SUBSET = SHARED_DATA / "CIFAR10-subset"


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> MNISTDataModule:
    datamodule = MNISTDataModule(shared_data)
    datamodule.setup("fit")
    return datamodule


def synthetic(**kwargs) -> SyntheticDataModule:
    datamodule = SyntheticDataModule(**{"num_train": 200, "num_test": 50, "batch_size": 32, **kwargs})
    datamodule.setup("fit")
    return datamodule


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- real data -------------------------------------------------------------------------------------


def test_shape_and_classes_known_before_setup() -> None:
    assert MNISTDataModule("/nonexistent").input_shape == (1, 28, 28)
    assert FashionMNISTDataModule("/nonexistent").num_classes == 10
    assert CIFAR10DataModule("/nonexistent").input_shape == (3, 32, 32)
    assert SyntheticDataModule(input_shape=[3, 8, 8], num_classes=4).input_shape == (3, 8, 8)


def test_mnist_in_memory_shapes_dtypes_and_normalisation(mnist: MNISTDataModule) -> None:
    assert (len(mnist.train_images), len(mnist.val_images), len(mnist.test_images)) == (54_000, 6_000, 10_000)
    for images, labels in [(mnist.train_images, mnist.train_labels), (mnist.test_images, mnist.test_labels)]:
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28) and images.is_contiguous()
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
    images, labels = next(iter(mnist.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (128, 1, 28, 28) and labels.shape == (128,)
    normalised = normalize(mnist.train_images, mnist.mean, mnist.std)
    assert abs(normalised.mean().item()) < 0.02 and abs(normalised.std().item() - 1) < 0.02


def test_fashion_mnist_reads_its_own_folder(shared_data: Path) -> None:
    datamodule = FashionMNISTDataModule(shared_data, val_size=5000)
    datamodule.setup("fit")
    assert (len(datamodule.train_images), len(datamodule.val_images)) == (55_000, 5_000)
    normalised = normalize(datamodule.train_images, datamodule.mean, datamodule.std)
    assert abs(normalised.mean().item()) < 0.02 and abs(normalised.std().item() - 1) < 0.02


def test_normalize_matches_torchvision() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    expected = torchvision.transforms.functional.normalize(images.float() / 255, mean, std)
    torch.testing.assert_close(normalize(images, mean, std), expected)
    floats = images.float()
    torch.testing.assert_close(normalize(floats, mean, std), expected)
    assert torch.equal(floats, images.float()), "normalize must not change its input"


def test_cifar10_partial_folder_reads_what_is_there(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    datamodule = CIFAR10DataModule(CIFAR_SUBSET, verify=False)
    with caplog.at_level(logging.INFO, logger="pruneflow.data"):
        datamodule.setup("fit")
    assert datamodule.images_found == {"train": 4000, "test": 1000}
    assert datamodule.batches_found == ["data_batch_1"]
    assert "4,000 training images from 1 of 5 batches (data_batch_1)" in caplog.text
    assert datamodule.train_images.shape == (3600, 3, 32, 32) and datamodule.augment
    # Rows hold R, G, B planes: decoded in that order, the channel means match CIFAR-10's published ones.
    per_channel = datamodule.train_images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(per_channel, torch.tensor(datamodule.mean), atol=0.02, rtol=0)


def test_cifar10_verify_rejects_subset_and_points_at_verify_false(shared_data: Path) -> None:
    with pytest.raises(DatasetCorruptError) as err:
        CIFAR10DataModule(CIFAR_SUBSET).setup("fit")
    assert_one_line(err, "md5", "data_batch_2 missing", "data.verify=false", str(CIFAR_SUBSET))


# --- missing and broken files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "files"),
    [
        (lambda root: MNISTDataModule(root), ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        (lambda root: CIFAR10DataModule(root), ["data_batch_1", "test_batch"]),
        (lambda root: CIFAR10DataModule(root, verify=False), ["data_batch_1", "data_batch_5"]),
    ],
)
def test_missing_data_is_one_line_naming_folder_files_and_fixes(tmp_path: Path, make, files: list[str]) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        make(tmp_path).setup("fit")
    assert isinstance(err.value, FileNotFoundError)
    assert_one_line(err, str(tmp_path), *files, "data.download=true", "data.root=", "PRUNEFLOW_DATA")
    assert not any(tmp_path.iterdir()), "reading must not write into root"


def test_truncated_idx_file_is_one_line_naming_the_file(shared_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (shared_data / "MNIST" / "raw").iterdir():
        (raw / source.name).symlink_to(source)
    (raw / "train-images-idx3-ubyte").unlink()
    with (shared_data / "MNIST" / "raw" / "train-images-idx3-ubyte").open("rb") as f:
        (raw / "train-images-idx3-ubyte").write_bytes(f.read(10_000))
    with pytest.raises(DatasetCorruptError) as err:
        MNISTDataModule(tmp_path).setup("fit")
    assert_one_line(err, str(raw / "train-images-idx3-ubyte"), "10,000 bytes", "47,040,016", "truncated")


def test_corrupt_cifar_batch_is_one_line_naming_the_file(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    shutil.copy(CIFAR_SUBSET / "cifar-10-batches-py" / "test_batch", folder)
    (folder / "data_batch_1").write_bytes((CIFAR_SUBSET / "cifar-10-batches-py" / "data_batch_1").read_bytes()[:5000])
    with pytest.raises(DatasetCorruptError) as err:
        CIFAR10DataModule(tmp_path, verify=False).setup("fit")
    assert_one_line(err, str(folder / "data_batch_1"))


def test_failed_download_is_one_line(tmp_path: Path) -> None:
    class UnreachableMNIST(torchvision.datasets.MNIST):
        mirrors = ("http://127.0.0.1:9/",)  # the discard port: refused at once, so this runs offline

    class UnreachableMNISTDataModule(MNISTDataModule):
        dataset_class = UnreachableMNIST

    with pytest.raises(DatasetNotFoundError) as err:
        UnreachableMNISTDataModule(tmp_path, download=True).prepare_data()
    assert_one_line(err, "could not download MNIST", str(tmp_path / "UnreachableMNIST" / "raw"))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"eval_batch_size": -1}, "eval_batch_size must be a positive int, got -1"),
        ({"val_size": 1.5}, "got 1.5"),
        ({"val_size": -3}, "got -3"),
        ({"limit_train": 0}, "limit_train must be a positive int or None, got 0"),
        ({"split_seed": -1}, "split_seed must be an int >= 0, got -1"),
        ({"augment": "yes"}, "augment must be"),
        ({"download": "no"}, "download must be true or false, got 'no'"),
    ],
)
def test_bad_arguments_are_rejected_in_one_line(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        MNISTDataModule("/nonexistent", **kwargs)
    assert_one_line(err, fragment)


def test_sizes_checked_against_the_data_at_setup() -> None:
    with pytest.raises(ValueError) as err:
        synthetic(val_size=200)
    assert_one_line(err, "val_size=200", "leaves none")
    with pytest.raises(ValueError) as err:
        synthetic(val_size=100, limit_train=101)
    assert_one_line(err, "limit_train=101", "at most 100")


# --- splits, shuffling, sharding -------------------------------------------------------------------


def test_split_is_seeded_disjoint_covering_and_independent_of_run_seed() -> None:
    train, val = split_indices(1000, 100, split_seed=0)
    assert len(val) == 100 and len(set(train.tolist()) | set(val.tolist())) == 1000
    torch.testing.assert_close(split_indices(1000, 100, split_seed=0)[1], val)
    assert not torch.equal(split_indices(1000, 100, split_seed=1)[1], val)

    first, other_run, other_split = synthetic(seed=0), synthetic(seed=7), synthetic(split_seed=1)
    assert torch.equal(first.val_images, other_run.val_images)
    assert torch.equal(first.train_labels, other_run.train_labels)
    assert not torch.equal(first.val_images, other_split.val_images)


def test_limit_train_takes_a_subset_of_the_post_split_training_set() -> None:
    full, limited = synthetic(), synthetic(limit_train=50)
    assert len(limited.train_images) == 50 and torch.equal(limited.val_images, full.val_images)
    full_rows = {tuple(image.flatten().tolist()) for image in full.train_images}
    assert all(tuple(image.flatten().tolist()) in full_rows for image in limited.train_images)


def batch_labels(batches: TensorBatches) -> list[int]:
    return torch.cat([labels for _, labels in batches]).tolist()


def test_shuffle_differs_by_epoch_and_reproduces_for_the_same_epoch() -> None:
    epoch = 0
    batches = TensorBatches(torch.zeros(100, 1, 2, 2), torch.arange(100), 16, shuffle=True, epoch=lambda: epoch)
    first = batch_labels(batches)
    assert sorted(first) == list(range(100)) and first != list(range(100)) and len(batches) == 7
    assert batch_labels(batches) == first
    epoch = 1
    assert batch_labels(batches) != first
    epoch = 0
    assert batch_labels(batches) == first


def test_drop_last_and_eval_order() -> None:
    images, labels = torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100)
    assert len(TensorBatches(images, labels, 16, shuffle=True, drop_last=True)) == 6
    assert len(batch_labels(TensorBatches(images, labels, 16, shuffle=True, drop_last=True))) == 96
    assert batch_labels(TensorBatches(images, labels, 30)) == list(range(100))


def test_rank_shards_are_disjoint_equal_and_cover_the_epoch() -> None:
    datamodule = synthetic(val_size=0, num_train=103, batch_size=8)
    datamodule.train_labels = torch.arange(103)  # labels that name their sample
    shards = []
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=3, current_epoch=4)
        loader = datamodule.train_dataloader()
        assert len(loader) == 5  # 34 images each, the 103rd dropped so that ranks step together
        shards.append(batch_labels(loader))
    assert all(len(shard) == 34 for shard in shards)
    assert len(set().union(*map(set, shards))) == 102


def test_train_loader_reads_the_epoch_when_iterated() -> None:
    datamodule = synthetic()
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    loader = datamodule.train_dataloader()
    epoch0 = batch_labels(loader)
    datamodule.trainer.current_epoch = 1
    assert batch_labels(loader) != epoch0
    datamodule.trainer.current_epoch = 0
    assert batch_labels(loader) == epoch0


# --- batch transforms ------------------------------------------------------------------------------


def window(image: torch.Tensor, top: int, left: int, size: int, flip: bool) -> torch.Tensor:
    crop = image[:, top : top + size, left : left + size]
    return crop.flip(-1) if flip else crop


def test_crop_flip_is_a_shifted_possibly_flipped_window_of_the_zero_padded_image() -> None:
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros, so padding shows
    out = random_crop_flip(images, 2, keyed_generator(0, 0, 0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = [(top, left, flip) for top in range(5) for left in range(5) for flip in (False, True)]
    seen = set()
    for image, result in zip(padded, out, strict=True):
        matches = [w for w in windows if torch.equal(result, window(image, *w[:2], 8, w[2]))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10 and {flip for *_, flip in seen} == {False, True}
    assert (out == 0).any(), "shifted windows must show the zero padding"


def test_augmentation_is_determined_by_seed_epoch_and_batch_index() -> None:
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    reference = random_crop_flip(images, 4, keyed_generator(1, 2, 3))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(random_crop_flip(images, 4, keyed_generator(1, 2, 3)), reference)
    for other in [(0, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert not torch.equal(random_crop_flip(images, 4, keyed_generator(*other)), reference)
    unpadded = random_crop_flip(images, 0, keyed_generator(0))
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(unpadded, images, strict=True))


def training_trainer(epoch: int, batch_idx: int) -> SimpleNamespace:
    """The parts of a Trainer that on_after_batch_transfer reads, during training batch ``batch_idx``."""
    progress = SimpleNamespace(current=SimpleNamespace(ready=batch_idx))
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(training=True, sanity_checking=False, current_epoch=epoch, global_rank=1, fit_loop=fit_loop)


def test_hook_augments_training_batches_only() -> None:
    datamodule = synthetic(augment=True)
    batch = next(iter(datamodule.train_dataloader()))
    plain = datamodule.transform_batch(batch, train=False)
    torch.testing.assert_close(plain[0], normalize(batch[0], datamodule.mean, datamodule.std))
    datamodule.trainer = training_trainer(epoch=2, batch_idx=5)
    augmented = datamodule.on_after_batch_transfer(batch, 0)
    assert torch.equal(augmented[0], datamodule.transform_batch(batch, train=True, epoch=2, batch_idx=5, rank=1)[0])
    assert not torch.equal(augmented[0], datamodule.transform_batch(batch, train=True, epoch=2, batch_idx=5)[0])
    assert not torch.equal(augmented[0], plain[0])
    datamodule.trainer.training = False
    assert torch.equal(datamodule.on_after_batch_transfer(batch, 0)[0], plain[0])
    assert torch.equal(synthetic().transform_batch(batch, train=True)[0], plain[0])  # augment off


# --- synthetic data and the Lightning loop ---------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable() -> None:
    first, again = synthetic(), synthetic()
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(synthetic(data_seed=1).train_images, first.train_images)
    # Nearest class mean on the training images classifies the test images: there is structure to learn.
    train = first.train_images.flatten(1).float()
    centres = torch.stack([train[first.train_labels == k].mean(0) for k in range(first.num_classes)])
    predicted = torch.cdist(first.test_images.flatten(1).float(), centres).argmin(1)
    assert (predicted == first.test_labels).float().mean() > 0.95
    rgb = synthetic(input_shape=[3, 12, 10], num_classes=3, augment=True)
    assert rgb.train_images.shape[1:] == (3, 12, 10) and len(rgb.mean) == 3


class RecordingSynthetic(SyntheticDataModule):
    """Records the (epoch, batch index) its hook derived each training batch's augmentation from."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_indices: list[tuple[int, int]] = []

    def transform_batch(self, batch, *, train, epoch=0, batch_idx=0, rank=0):
        if train:
            self.hook_indices.append((epoch, batch_idx))
        return super().transform_batch(batch, train=train, epoch=epoch, batch_idx=batch_idx, rank=rank)


class RecordingClassifier(L.LightningModule):
    """Records what reaches training_step, to check the datamodule's hook inside a real Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.seen = nn.Linear(28 * 28, 10), []

    def training_step(self, batch, batch_idx: int):
        hook_index = self.trainer.datamodule.hook_indices[-1]
        self.seen.append((self.current_epoch, batch_idx, hook_index, batch[0].dtype))
        return nn.functional.cross_entropy(self.linear(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx: int) -> None:
        assert batch[0].dtype == torch.float32

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loop_sees_normalised_batches_with_matching_batch_index(tmp_path: Path) -> None:
    datamodule = RecordingSynthetic(num_train=160, num_test=40, batch_size=32, augment=True)
    module = RecordingClassifier()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert [(epoch, index) for epoch, index, *_ in module.seen] == [(e, i) for e in range(2) for i in range(5)]
    assert all(hook == (epoch, index) and dtype == torch.float32 for epoch, index, hook, dtype in module.seen)


class ValidationBatchSizes(RecordingClassifier):
    """Records (sanity checking?, images) of every validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.validation_batches: list[tuple[bool, int]] = []

    def validation_step(self, batch, batch_idx: int) -> None:
        self.validation_batches.append((self.trainer.sanity_checking, len(batch[0])))


def test_sanity_check_validates_a_training_batch_worth_and_validation_sees_whole_batches(tmp_path: Path) -> None:
    datamodule = RecordingSynthetic(num_train=160, num_test=40, val_size=40, batch_size=16, eval_batch_size=40)
    module = ValidationBatchSizes()
    trainer = L.Trainer(max_epochs=1, num_sanity_val_steps=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert module.validation_batches == [(True, 16), (False, 40)]
