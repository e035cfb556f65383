"""A client's records, read one at a time: a shard never has to fit in memory.

Every dataset is map-style (`len`, item `i`), which is all Opacus's Poisson sampler and torch's
DataLoader need. An item is `(features, target)`: features float32 and channel-first (uint8 images
scaled to [0, 1]); the target an int64 class id (classification) or float32 values (regression,
multilabel). Implementations:

- ArrayDataset: numpy arrays, in memory or memory-mapped from .npy files (read as indexed);
- ImageFolderDataset: image files decoded when an item is read, optionally resized to one size;
- CsvDataset: one CSV row parsed when read, found by its byte offset (indexed once);
- TorchDataset: any map-style `torch.utils.data.Dataset` of (features, target) pairs;
- Subset, Transformed: a view of some items; items passed through a per-sample transform.
"""

from __future__ import annotations

import csv
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.errors import FedtrainError

Item = tuple[np.ndarray, Any]  # (features, target)


class Dataset(ABC):
    """A shard's records. `class_names` is set for classification (targets are class ids)."""

    class_names: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Item:
        """Item `index` as (float32 features, target)."""

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """Several items (torch's DataLoader fetches a batch through this)."""
        return [self[int(i)] for i in indices]

    @abstractmethod
    def targets(self) -> np.ndarray:
        """Every item's target, in order (class ids are small: what splits and checks need)."""

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self[0][0].shape] if len(self) else []

    @property
    def num_classes(self) -> int:
        return len(self.class_names or [])

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        return Subset(self, np.asarray(indices, dtype=np.int64))

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items `indices`, stacked: (features, targets)."""
        items = self.__getitems__([int(i) for i in indices])
        return np.stack([x for x, _ in items]), np.stack([np.asarray(y) for _, y in items])


def features(raw: np.ndarray) -> np.ndarray:
    """One sample as fedtrain's models see it: float32, uint8 scaled to [0, 1], images channel-first."""
    scale = np.float32(255.0) if raw.dtype == np.uint8 else np.float32(1.0)
    x = np.asarray(raw, dtype=np.float32) / scale
    if x.ndim == 0:
        return x.reshape(1)
    if x.ndim == 2:  # a channel-less image H x W
        return x[None, :, :]
    if x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # channels-last -> channel-first
    return x


class ArrayDataset(Dataset):
    """Features and targets as arrays (a memory-mapped .npy is read one item at a time)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, class_names: list[str] | None = None) -> None:
        if len(x) != len(y):
            raise ValueError("features and targets of different lengths")
        self.x, self.y, self.class_names = x, y, class_names

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> Item:
        return features(self.x[index]), self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        x = _batch_features(self.x[np.asarray(indices, dtype=np.int64)])
        y = self.y[np.asarray(indices, dtype=np.int64)]
        return list(zip(x, y, strict=True))

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64)
        return _batch_features(self.x[index]), self.y[index]

    def targets(self) -> np.ndarray:
        return np.asarray(self.y)


def _batch_features(raw: np.ndarray) -> np.ndarray:
    """`features` of a stack of samples, vectorised."""
    scale = np.float32(255.0) if raw.dtype == np.uint8 else np.float32(1.0)
    x = np.asarray(raw, dtype=np.float32) / scale
    if x.ndim == 1:
        return x[:, None]
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


class ImageFolderDataset(Dataset):
    """Image files, each decoded when read: grey ("L") or colour ("RGB") for the whole folder, and
    resized to `size` (height, width) when given, so images of mixed sizes make one shape."""

    def __init__(
        self, files: list[Path], labels: np.ndarray, class_names: list[str], mode: str, size: tuple[int, int] | None
    ) -> None:
        self.files, self.labels, self.class_names, self.mode, self.size = files, labels, class_names, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> Any:
        """Item `index` as a PIL image in the folder's mode and size (what transforms take)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[index]) as img:
                picture = img.convert(self.mode)
        except (UnidentifiedImageError, OSError) as exc:
            raise FedtrainError(
                f"image {self.files[index]} cannot be read ({type(exc).__name__}); remove or fix it."
            ) from None
        if self.size is not None and picture.size != (self.size[1], self.size[0]):
            picture = picture.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        return picture

    def __getitem__(self, index: int) -> Item:
        return features(np.asarray(self.image(index), dtype=np.uint8)), self.labels[index]

    def targets(self) -> np.ndarray:
        return self.labels


class CsvDataset(Dataset):
    """A CSV file's rows, each parsed when read; only the rows' byte offsets are kept in memory."""

    def __init__(self, path: Path, offsets: np.ndarray, feature_columns: list[int], targets: np.ndarray,
                 class_names: list[str] | None) -> None:  # fmt: skip
        self.path, self.offsets, self.columns, self.target_values = path, offsets, feature_columns, targets
        self.class_names = class_names
        self._handle: io.BufferedReader | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}  # an open file does not travel to another process

    def __getitem__(self, index: int) -> Item:
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open while the dataset lives
        self._handle.seek(int(self.offsets[index]))
        row = next(csv.reader([self._handle.readline().decode("utf-8")]))
        return np.asarray([float(row[c]) for c in self.columns], dtype=np.float32), self.target_values[index]

    def targets(self) -> np.ndarray:
        return self.target_values


class TorchDataset(Dataset):
    """Any map-style torch Dataset of (features, target) pairs; features become float32 numpy arrays.

    The targets are read once, when it is wrapped, and encoded as the task needs (class ids numbered
    like every client's): `targets` here, in the dataset's order."""

    def __init__(self, dataset: Any, targets: np.ndarray, class_names: list[str] | None) -> None:
        self.dataset, self.target_values, self.class_names = dataset, targets, class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        x = self.dataset[index][0]
        array = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        return features(array), self.target_values[index]

    def targets(self) -> np.ndarray:
        return self.target_values


class Subset(Dataset):
    """Items `indices` of another dataset."""

    def __init__(self, base: Dataset, indices: np.ndarray) -> None:
        self.base, self.indices, self.class_names = base, indices, base.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Item:
        return self.base[int(self.indices[index])]

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        return self.base.__getitems__([int(self.indices[i]) for i in indices])

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.base.batch(self.indices[np.asarray(indices, dtype=np.int64)])

    def targets(self) -> np.ndarray:
        return self.base.targets()[self.indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        return Subset(self.base, self.indices[np.asarray(indices, dtype=np.int64)])


class Transformed(Dataset):
    """Items of another dataset with `transform` applied to their features (e.g. augmentation: a fresh
    random view each time an item is read; it reads one sample only, so it costs no privacy)."""

    def __init__(self, base: Dataset, transform: Callable[[np.ndarray], np.ndarray]) -> None:
        self.base, self.transform, self.class_names = base, transform, base.class_names

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Item:
        x, y = self.base[index]
        return np.asarray(self.transform(x), dtype=np.float32), y

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        return [(np.asarray(self.transform(x), dtype=np.float32), y) for x, y in self.base.__getitems__(indices)]

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = self.__getitems__([int(i) for i in indices])
        return np.stack([x for x, _ in items]), np.stack([np.asarray(y) for _, y in items])

    def targets(self) -> np.ndarray:
        return self.base.targets()
