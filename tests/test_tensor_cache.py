"""Tests of the decoded-split cache (pruneflow.data.tensor_cache) through the data modules that use it, on tiny
fake MNIST idx files and CIFAR-10 pickles written here: a hit serves exactly what a fresh read gives, and a
changed source, a broken entry or an unwritable cache folder never serves wrong data nor stops a run."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from pruneflow.data import CIFAR10DataModule, MNISTDataModule
from pruneflow.data.base import InMemoryImageDataModule
from pruneflow.data.tensor_cache import default_cache_dir

NUM_TRAIN, NUM_TEST = 40, 10


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file as MNIST ships it: magic (uint8 type 0x08, rank), big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, seed: int = 0) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    return raw


def read(datamodule: InMemoryImageDataModule) -> dict[str, torch.Tensor]:
    datamodule.setup("fit")
    return {f"{split}_{part}": getattr(datamodule, f"{split}_{part}") for split in ("train", "val", "test")
            for part in ("images", "labels")}  # fmt: skip


def assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


class NoReads(MNISTDataModule):
    """An MNIST module that fails if it decodes the files: what it returns came from the cache."""

    def read_split(self, train: bool):
        raise AssertionError("decoded the files although a current cache entry exists")


def test_cache_hit_equals_a_fresh_read(tmp_path: Path) -> None:
    fake_mnist(tmp_path / "data")
    cache = tmp_path / "cache"
    fresh = read(MNISTDataModule(tmp_path / "data", cache=False, val_size=8))
    assert not cache.exists()
    first = read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=8))
    assert sorted(path.name.split("-")[1] for path in cache.glob("*.pt")) == ["test", "train"]
    hit = read(NoReads(tmp_path / "data", cache_dir=cache, val_size=8))
    assert_bit_identical(first, fresh)
    assert_bit_identical(hit, fresh)
    assert not [path for path in cache.iterdir() if path.suffix != ".pt"], "temporary files left behind"


def test_changed_source_file_is_read_again(tmp_path: Path) -> None:
    raw = fake_mnist(tmp_path / "data")
    cache = tmp_path / "cache"
    read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=0))
    labels = raw / "train-labels-idx1-ubyte"
    stat = labels.stat()
    write_idx(labels, (np.arange(NUM_TRAIN) + 3) % 10)  # same size: only the content and mtime differ
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert labels.stat().st_size == stat.st_size
    changed = read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=0))
    assert torch.equal(changed["train_labels"], torch.from_numpy((np.arange(NUM_TRAIN) + 3) % 10))
    # The rebuilt entry is current again: a reader that cannot decode gets the new labels from it.
    assert torch.equal(read(NoReads(tmp_path / "data", cache_dir=cache, val_size=0))["train_labels"],
                       changed["train_labels"])  # fmt: skip


def corrupt_entry(path: Path, how: str, images: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    elif how == "flipped image byte":  # the zip stores tensors uncompressed: find the images and change one byte
        at = bytes(data).index(images.numpy().tobytes()[:64]) + 100
        data[at] ^= 0xFF
    else:
        data = bytearray(b"not a torch file")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped image byte", "garbage"])
def test_broken_cache_entry_is_rebuilt_not_served(tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    fake_mnist(tmp_path / "data")
    cache = tmp_path / "cache"
    fresh = read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=8))
    (train_entry,) = cache.glob("MNIST-train-*.pt")
    corrupt_entry(train_entry, how, MNISTDataModule(tmp_path / "data").read_split(train=True)[0])
    with caplog.at_level(logging.WARNING, logger="pruneflow.data.tensor_cache"):
        again = read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=8))
    assert_bit_identical(again, fresh)
    assert "unreadable" in caplog.text and str(train_entry) in caplog.text
    assert_bit_identical(read(NoReads(tmp_path / "data", cache_dir=cache, val_size=8)), fresh)  # rewritten whole


def test_unwritable_cache_folder_reads_the_files_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_mnist(tmp_path / "data")
    blocker = tmp_path / "a file"
    blocker.write_text("")  # a folder under a file cannot be created, even by root (chmod would not stop root)
    fresh = read(MNISTDataModule(tmp_path / "data", cache=False))
    with caplog.at_level(logging.WARNING, logger="pruneflow.data.tensor_cache"):
        got = read(MNISTDataModule(tmp_path / "data", cache_dir=blocker / "cache"))
        read(MNISTDataModule(tmp_path / "data", cache_dir=blocker / "cache"))
    assert_bit_identical(got, fresh)
    warnings = [record for record in caplog.records if "cannot write the data cache" in record.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "data.cache_dir" in warnings[0].getMessage() and "PRUNEFLOW_CACHE" in warnings[0].getMessage()


def write_cifar_batch(path: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    entry = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": list(np.arange(count) % 10)}
    with path.open("wb") as f:
        pickle.dump(entry, f)


def test_cifar_cache_hit_keeps_what_was_found_and_an_added_batch_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    write_cifar_batch(folder / "data_batch_1", 30, seed=1)
    write_cifar_batch(folder / "test_batch", 10, seed=2)
    cache = tmp_path / "cache"
    first = CIFAR10DataModule(tmp_path / "data", verify=False, cache_dir=cache, val_size=0)
    read(first)

    class CifarNoReads(CIFAR10DataModule):
        def read_split(self, train: bool):
            raise AssertionError("decoded the files although a current cache entry exists")

    hit = CifarNoReads(tmp_path / "data", verify=False, cache_dir=cache, val_size=0)
    with caplog.at_level(logging.INFO, logger="pruneflow.data"):
        assert_bit_identical(
            read(hit), read(CIFAR10DataModule(tmp_path / "data", verify=False, cache=False, val_size=0))
        )
    assert (hit.images_found, hit.batches_found) == (first.images_found, first.batches_found) == (
        {"train": 30, "test": 10}, ["data_batch_1"])  # fmt: skip
    assert "30 training images from 1 of 5 batches (data_batch_1)" in caplog.text
    write_cifar_batch(folder / "data_batch_2", 20, seed=3)
    grown = CIFAR10DataModule(tmp_path / "data", verify=False, cache_dir=cache, val_size=0)
    read(grown)
    assert grown.images_found["train"] == 50 and grown.batches_found == ["data_batch_1", "data_batch_2"]


def test_default_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNEFLOW_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PRUNEFLOW_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pruneflow" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "pruneflow" / "data"


def test_concurrent_runs_each_get_whole_data_and_leave_one_valid_entry(tmp_path: Path) -> None:
    """Runs of a sweep build the same entry at once: each writes its own temporary file and renames it over
    the entry, so every reader sees a whole entry (or none) whichever writer wins."""
    fake_mnist(tmp_path / "data")
    cache = tmp_path / "cache"
    fresh = read(MNISTDataModule(tmp_path / "data", cache=False, val_size=8))
    start = threading.Barrier(6)

    def run(_: int) -> dict[str, torch.Tensor]:
        start.wait()
        return read(MNISTDataModule(tmp_path / "data", cache_dir=cache, val_size=8))

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, range(6)))
    for result in results:
        assert_bit_identical(result, fresh)
    assert sorted(path.name.split("-")[1] for path in cache.iterdir()) == ["test", "train"]
    assert_bit_identical(read(NoReads(tmp_path / "data", cache_dir=cache, val_size=8)), fresh)
