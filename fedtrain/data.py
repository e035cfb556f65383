"""Load one private shard from disk, and split a dataset into shards for simulation.

Formats: `.npz` (arrays `x`, `y`), `.pt`/`.pth` (dict of tensors `x`, `y`), `.csv` (numeric
features, label column by name) and an image folder (one sub-folder per class). Whatever the
format, a shard becomes float32 features (uint8 images scaled to [0, 1], channel-first) and
int64 class ids. String labels are numbered through the run config's `labels` list, so every
client numbers them the same way.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrain.config import Config
from fedtrain.errors import FedtrainError

BUILTIN = ("digits",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
TABULAR_SUFFIXES = {".npz", ".pt", ".pth", ".csv"}


@dataclass
class Dataset:
    """Features `x` (float32, N x ...) and class ids `y` (int64), with the class names."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.x.shape[1:]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.x[indices], self.y[indices], self.class_names)


# ---------------------------------------------------------------- loading


def load_builtin(name: str) -> Dataset:
    """A dataset that ships with a dependency (no download at run time)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # 8x8 grey images in [0, 1]
        return Dataset(x, digits.target.astype(np.int64), [str(i) for i in range(10)])
    raise FedtrainError(f"unknown built-in dataset {name!r}; built-ins are: {', '.join(BUILTIN)}.")


def load_shard(path: str | Path, config: Config, *, infer_labels: bool = False) -> Dataset:
    """Load one dataset file or image folder; every defect is a one-sentence FedtrainError.

    With `infer_labels`, string labels are numbered in sorted order (used once, by the
    simulation, on the whole dataset); otherwise they must be listed in `config.data.labels`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FedtrainError(f"data path {path} does not exist; check the path given with --data.")
    if path.is_dir():
        x, raw_labels = _read_image_folder(path)
    elif path.suffix.lower() == ".npz":
        x, raw_labels = _read_npz(path)
    elif path.suffix.lower() in (".pt", ".pth"):
        x, raw_labels = _read_pt(path)
    elif path.suffix.lower() == ".csv":
        x, raw_labels = _read_csv(path, config.data.label_column)
    else:
        raise FedtrainError(
            f"cannot read {path}: unknown format {path.suffix or '(no suffix)'}; "
            "use .npz, .pt, .csv or a folder of images with one sub-folder per class."
        )
    if len(x) != len(raw_labels):
        raise FedtrainError(
            f"{path} has {len(x)} samples but {len(raw_labels)} labels; both must have one entry per sample."
        )
    if len(x) == 0:
        raise FedtrainError(f"{path} holds no samples; give a shard with at least one example.")
    features = _to_features(x, path)
    y, names = encode_labels(raw_labels, config, str(path), infer=infer_labels)
    return Dataset(features, y, names)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise FedtrainError(
                    f"{path} has no array {missing[0]!r} (found: {', '.join(archive.files) or 'none'}); "
                    "save features as 'x' and labels as 'y'."
                )
            return np.asarray(archive["x"]), np.asarray(archive["y"])
    except FedtrainError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise FedtrainError(
                f"{path} stores Python objects, which fedtrain never unpickles; save plain numeric arrays."
            ) from None
        raise FedtrainError(f"{path} is not a readable .npz file ({exc}).") from None
    except Exception as exc:  # zipfile/OSError/EOFError on a corrupt archive
        raise FedtrainError(f"{path} is not a readable .npz file ({type(exc).__name__}).") from None


def _read_pt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:
        raise FedtrainError(
            f"{path} is not a readable tensor file ({type(exc).__name__}); save a dict of tensors "
            "{'x': ..., 'y': ...} with torch.save."
        ) from None
    if not isinstance(obj, dict) or "x" not in obj or "y" not in obj:
        raise FedtrainError(f"{path} must hold a dict with tensors 'x' and 'y'; save it with torch.save.")

    def as_array(value: object) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)

    return as_array(obj["x"]), as_array(obj["y"])


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FedtrainError(f"{path} is not a readable CSV file ({exc}).") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise FedtrainError(f"{path} is empty; a CSV shard needs a header row and one row per sample.")
    header = [cell.strip() for cell in rows[0]]
    if label_column not in header:
        raise FedtrainError(
            f"{path} has no label column {label_column!r} (columns: {', '.join(header)}); "
            "set label_column to the right name."
        )
    label_at = header.index(label_column)
    features, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise FedtrainError(f"{path} line {line_no} has {len(row)} fields, the header has {len(header)}.")
        values = []
        for col, cell in enumerate(row):
            if col == label_at:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                raise FedtrainError(
                    f"{path} line {line_no}, column {header[col]!r}: {cell!r} is not a number; "
                    "CSV features must be numeric."
                ) from None
        features.append(values)
        labels.append(row[label_at].strip())
    if not features:
        raise FedtrainError(f"{path} has a header but no rows; a CSV shard needs one row per sample.")
    return np.asarray(features, dtype=np.float32).reshape(len(features), -1), np.asarray(labels)


def _read_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FedtrainError(f"image folder {path} has no class sub-folders; put each class's images in its own.")
    images, labels = [], []
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img.load()
                    images.append(img.copy())
            except (UnidentifiedImageError, OSError) as exc:
                raise FedtrainError(f"image {file} cannot be read ({type(exc).__name__}); remove or fix it.") from None
            labels.append(folder.name)
    if not images:
        raise FedtrainError(f"image folder {path} holds no PNG or JPEG images.")
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise FedtrainError(
            f"images in {path} have different sizes ({a[0]}x{a[1]} and {b[0]}x{b[1]}); resize them to one size."
        )
    grey = all(img.mode in ("1", "L", "LA", "I", "I;16") for img in images)
    mode = "L" if grey else "RGB"
    stacked = np.stack([np.asarray(img.convert(mode), dtype=np.uint8) for img in images])
    return stacked, np.asarray(labels)


def _to_features(x: np.ndarray, source: Path) -> np.ndarray:
    """float32, channel-first images; uint8 scaled to [0, 1]; no NaN or infinity."""
    if x.dtype == bool:
        x = x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.number):
        raise FedtrainError(f"features in {source} are not numeric (dtype {x.dtype}); convert them to numbers.")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / np.float32(scale)
    if x.ndim == 1:
        x = x[:, None]
    elif x.ndim == 3:  # channel-less images N x H x W
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # channels-last -> channel-first
    if not np.isfinite(x).all():
        raise FedtrainError(f"features in {source} contain NaN or infinite values; clean the data first.")
    return x


def _label_key(value: object) -> str:
    """The name of a raw label: 3, 3.0, '3' and ' 3' all name class '3'."""
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip()
        try:
            number = float(value)
        except ValueError:
            return value
        return str(int(number)) if number.is_integer() else value
    number = float(value)  # type: ignore[arg-type]  # numpy numbers
    return str(int(number)) if number.is_integer() else repr(number)


def encode_labels(raw: np.ndarray, config: Config, source: str, *, infer: bool) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to class ids 0..K-1 and return (ids, class names)."""
    raw = np.asarray(raw).reshape(-1)
    keys = [_label_key(v) for v in raw.tolist()]
    fraction = next((k for k in keys if _is_fraction(k)), None)
    if fraction is not None and fraction not in (config.data.labels or []):
        raise FedtrainError(
            f"label {fraction} in {source} is not a whole number; class labels are 0, 1, 2, ... "
            "(or names listed in labels): fix the data."
        )
    if config.data.labels:
        index = {name: i for i, name in enumerate(config.data.labels)}
        unknown = next((k for k in keys if k not in index), None)
        if unknown is not None:
            raise FedtrainError(
                f"label {unknown!r} in {source} is not one of the configured labels "
                f"({', '.join(config.data.labels)}); add it to labels or fix the data."
            )
        return np.asarray([index[k] for k in keys], dtype=np.int64), list(config.data.labels)
    if all(_is_int(k) for k in keys):
        ids = np.asarray([int(k) for k in keys], dtype=np.int64)
        if infer and config.data.num_classes is None:  # simulation: number the classes present, in order
            names = [str(v) for v in sorted(set(ids.tolist()))]
            return _renumber(ids, names), names
        count = config.data.num_classes or int(ids.max()) + 1
        bad = ids[(ids < 0) | (ids >= count)]
        if bad.size:
            raise FedtrainError(
                f"label {int(bad[0])} in {source} is out of range: with {count} classes labels must be "
                f"0..{count - 1}; fix the data or set num_classes."
            )
        return ids, [str(i) for i in range(count)]
    if infer:
        names = sorted(set(keys))
        return np.asarray([names.index(k) for k in keys], dtype=np.int64), names
    example = next(k for k in keys if not _is_int(k))
    raise FedtrainError(
        f"labels in {source} are names (e.g. {example!r}); list every class in the config "
        "(labels = [...]) so all clients number them the same way."
    )


def _is_int(key: str) -> bool:
    return key.lstrip("-").isdigit()


def _is_fraction(key: str) -> bool:
    """A numeric label that is not a whole number (0.5, nan, inf): a class id cannot be one."""
    try:
        float(key)
    except ValueError:
        return False
    return not _is_int(key)


def check_client_shard(path: str | Path, declared: Config | None) -> Dataset:
    """Load a real client's shard and check it against the federation's data, before connecting.

    Args:
        path: the shard (file or image folder).
        declared: the kit's data description (input_shape, classes, label column), or None when
            the kit has none: then only what is wrong on its own is refused (negative or fractional
            numeric labels, and every defect `load_shard` finds).

    Returns:
        The shard, its labels numbered as the federation numbers them.

    Raises:
        FedtrainError: one sentence for the first defect found.
    """
    if declared is None:
        shard = load_shard(path, Config(), infer_labels=True)
        negative = next((name for name in shard.class_names if _is_int(name) and int(name) < 0), None)
        if negative is not None:
            raise FedtrainError(
                f"label {negative} in {path} is negative; class labels are 0, 1, 2, ... (or names): fix the data."
            )
        return shard
    shard = load_shard(path, declared)
    if declared.data.input_shape and shard.input_shape != list(declared.data.input_shape):
        raise FedtrainError(
            f"samples in {path} have shape {shard.input_shape}, but this federation's model takes "
            f"{list(declared.data.input_shape)} (the kit's federation.toml); give a shard of that shape."
        )
    return shard


def _renumber(ids: np.ndarray, names: list[str]) -> np.ndarray:
    lookup = {int(name): i for i, name in enumerate(names)}
    return np.asarray([lookup[int(v)] for v in ids], dtype=np.int64)


def load_source(config: Config) -> Dataset:
    """The whole dataset a simulation splits: a built-in name or a file/folder."""
    if config.data.source in BUILTIN:
        return load_builtin(config.data.source)
    return load_shard(config.data.source, config, infer_labels=config.data.labels is None)
