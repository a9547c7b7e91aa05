"""A synthetic image-classification data set for fast tests: no files, learnable, deterministic.

Each class has a fixed random uint8 template; an image is its class's template plus Gaussian noise.
A small network separates the classes within a few steps, so tests can check that training learns
without reading a real data set. Same base class, batches and transforms as the real data sets.
"""

from collections.abc import Sequence
from typing import Any

import torch

from pruneflow.data.base import Batch, InMemoryImageDataModule
from pruneflow.data.transforms import keyed_generator
from pruneflow.errors import ConfigError


class SyntheticDataModule(InMemoryImageDataModule):
    """Class templates plus noise, generated from ``data_seed``.

    Args:
        num_train: images in the "official" training split (the validation split is carved from it).
        num_test: images in the test split.
        input_shape: (C, H, W) of the images.
        num_classes: number of classes (and templates).
        data_seed: seed of the images themselves; kept apart from the run ``seed`` (shuffling,
            augmentation) so that runs with different seeds see the same data set.
        noise_std: standard deviation of the per-pixel noise, in uint8 units (templates span 0..255).
        **kwargs: see ``InMemoryImageDataModule``.

    ``mean``/``std`` are those of the generated training images, known after ``setup``.
    """

    name = "synthetic"

    def __init__(
        self,
        num_train: int = 1000,
        num_test: int = 200,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        data_seed: int = 0,
        noise_std: float = 64.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        counts = (("num_train", num_train, 2), ("num_test", num_test, 1), ("num_classes", num_classes, 2))
        for arg, value, least in counts:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{arg} must be an int >= {least}, got {value!r}")
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ConfigError(f"input_shape must be three positive ints (C, H, W), got {list(shape)}")
        if not isinstance(data_seed, int) or data_seed < 0:
            raise ConfigError(f"data_seed must be an int >= 0, got {data_seed!r}")
        if not noise_std >= 0:
            raise ConfigError(f"noise_std must be >= 0, got {noise_std!r}")
        self.num_train, self.num_test, self.data_seed, self.noise_std = num_train, num_test, data_seed, noise_std
        self.input_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.num_classes = num_classes

    def read_split(self, train: bool) -> Batch:
        # Both splits share the templates (stream 0); each split draws its own labels and noise.
        templates = torch.randint(
            0, 256, (self.num_classes, *self.input_shape), generator=keyed_generator(self.data_seed, 0)
        ).float()
        generator = keyed_generator(self.data_seed, 1 if train else 2)
        count = self.num_train if train else self.num_test
        labels = torch.randperm(count, generator=generator) % self.num_classes  # balanced classes
        noise = torch.randn(count, *self.input_shape, generator=generator) * self.noise_std
        images = (templates[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
        if train:
            pixels = images.transpose(0, 1).reshape(self.input_shape[0], -1).float() / 255
            self.mean, self.std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
        return images, labels
