"""Per-sample transforms in the style of torchvision's, on fedtrain's samples (float32, channel-first).

Each reads one sample only, so augmentation costs no privacy. Random ones draw from a generator
seeded by the OS: a fresh view each time a sample is read.

    from fedtrain.data.transforms import Compose, RandomCrop, RandomHorizontalFlip
    augment = Compose([RandomCrop(32, padding=4), RandomHorizontalFlip()])
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


class _Random:
    """A generator seeded by the OS in each process (a transform pickled to another process, as a
    simulation's clients get theirs, draws its own views there)."""

    _rng: np.random.Generator | None = None
    _pid: int | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            self._rng, self._pid = np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128))), os.getpid()
        return self._rng


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            x = transform(x)
        return x


class RandomHorizontalFlip(_Random):
    """Mirror an image (C x H x W) left-right with probability `p`."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[..., ::-1]) if self.rng.random() < self.p else x


class RandomCrop(_Random):
    """A random `size` (int or (h, w)) window of an image (C x H x W), zero-padded by `padding` first."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.padding = padding

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.padding:
            x = np.pad(x, ((0, 0), (self.padding, self.padding), (self.padding, self.padding)))
        height, width = x.shape[-2:]
        top = int(self.rng.integers(0, height - self.size[0] + 1))
        left = int(self.rng.integers(0, width - self.size[1] + 1))
        return np.ascontiguousarray(x[..., top : top + self.size[0], left : left + self.size[1]])


class CenterCrop:
    """The central `size` (int or (h, w)) window of an image (C x H x W)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        height, width = x.shape[-2:]
        top, left = (height - self.size[0]) // 2, (width - self.size[1]) // 2
        return np.ascontiguousarray(x[..., top : top + self.size[0], left : left + self.size[1]])


class Normalize:
    """(x - mean) / std per channel, with constants you know in advance (never fitted on private data:
    that would read the data set, and cost privacy)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std
