"""The decoded-split cache: a data set's images and labels, read once from torchvision's files, kept as one tensor file.

Decoding MNIST's idx files or CIFAR-10's pickles (and md5-checking them) costs every run the same work; the
first run writes each split's uint8 images and int64 labels with ``torch.save`` into the cache folder, and
later runs map that file (``torch.load(mmap=True, weights_only=True)``) instead.

Where: ``data.cache_dir`` (conf/data/_files.yaml), else the ``PRUNEFLOW_CACHE`` environment variable, else
``$XDG_CACHE_HOME/pruneflow/data`` (``~/.cache/pruneflow/data``). Not beside the data: data folders are
often shared and read-only (``../shared/data`` is), a per-user cache folder is writable.

What makes an entry valid:

- its file name holds the data set's name, the split and a hash of the source folder and reader options,
  so one entry per (data set, split, location, settings) and a rebuild overwrites it in place;
- inside, ``sources`` records every source file's name, size, modification time (ns) and inode; a file
  changed, replaced or added since makes the entry stale, and it is rebuilt from the files;
- a CRC-32 of the images' and labels' bytes, checked on every load: a truncated or corrupted entry is
  logged and rebuilt, never served (an entry that cannot be unpickled is rebuilt the same way).

Entries are written with ``pruneflow.atomic_io`` (a temporary file renamed over the entry), so concurrent
runs of a sweep each see a whole entry or none; the last writer wins and every writer wrote the same data.
A cache folder that cannot be written is logged once and the run goes on with the data it read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pruneflow.atomic_io import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the entry's layout changes: older entries then fail the check and are rebuilt
CACHE_ENV = "PRUNEFLOW_CACHE"

_unwritable_reported: set[Path] = set()


def default_cache_dir() -> Path:
    """``$PRUNEFLOW_CACHE``, else ``$XDG_CACHE_HOME/pruneflow/data``, else ``~/.cache/pruneflow/data``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pruneflow" / "data"


def source_stamps(files: Sequence[Path]) -> list[list[Any]]:
    """What identifies each source file's content without reading it: name, size, mtime (ns) and inode."""
    stamps = []
    for path in sorted(files):
        stat = path.stat()
        stamps.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return stamps


def checksum(images: Tensor, labels: Tensor) -> int:
    """CRC-32 of the images' and then the labels' bytes (about 10 ms for MNIST's 47 MB)."""
    crc = zlib.crc32(images.contiguous().view(torch.uint8).numpy().data)
    return zlib.crc32(labels.contiguous().view(torch.uint8).numpy().data, crc)


class SplitCache:
    """One cached split: ``load_or_read(read)`` returns it from the entry, or reads, stores and returns it.

    Args:
        folder: the cache folder (created on the first write).
        name: the data set's name (file-name safe), e.g. ``MNIST``.
        split: ``train`` or ``test``.
        settings: what else decides the decoded tensors (the source folder, reader options); hashed
            into the entry's file name.
        sources: the files the split is decoded from; their stamps decide whether the entry is current.
    """

    def __init__(self, folder: Path, name: str, split: str, settings: dict[str, Any], sources: Sequence[Path]) -> None:
        self.folder = Path(folder)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = self.folder / f"{name}-{split}-{digest}.pt"
        self.sources = list(sources)

    def load_or_read(self, read: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        stamps = source_stamps(self.sources)
        cached = self.load(stamps)
        if cached is not None:
            return cached
        images, labels = read()
        self.store(images, labels, stamps)
        return images, labels

    def load(self, stamps: list[list[Any]]) -> tuple[Tensor, Tensor] | None:
        """The entry's tensors if it exists, is whole and matches ``stamps``; None otherwise (logged when broken)."""
        if not self.path.is_file():
            return None
        try:
            entry = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            images, labels = entry["images"], entry["labels"]
            if entry["format"] != FORMAT_VERSION or entry["sources"] != stamps:
                log.info("data cache %s is stale (its source files changed); reading the files again", self.path)
                return None
            if checksum(images, labels) != entry["crc32"]:
                raise ValueError("its checksum does not match its tensors")
        except Exception as err:  # whatever is wrong with the entry, the files are the truth
            log.warning("data cache %s is unreadable (%s); reading the files again and rewriting it",
                        self.path, " ".join(str(err).split()) or type(err).__name__)  # fmt: skip
            return None
        return images, labels

    def store(self, images: Tensor, labels: Tensor, stamps: list[list[Any]]) -> None:
        """Write the entry atomically; a folder that cannot be written is reported once per process."""
        entry = {"format": FORMAT_VERSION, "sources": stamps, "images": images.contiguous(),
                 "labels": labels.contiguous(), "crc32": checksum(images, labels)}  # fmt: skip
        try:
            with atomic_open(self.path, "wb") as handle:
                torch.save(entry, handle)
        except OSError as err:
            if self.folder not in _unwritable_reported:
                _unwritable_reported.add(self.folder)
                log.warning("cannot write the data cache in %s (%s); reading the data files every run — set "
                            "data.cache_dir or %s to a writable folder, or data.cache=false to stop trying",
                            self.folder, err.strerror or err, CACHE_ENV)  # fmt: skip
