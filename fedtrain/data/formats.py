"""Reading a shard from disk into a Dataset (data/datasets.py); every defect is one sentence.

Formats: `.npz` (arrays `x`, `y`), a folder holding `x.npy` and `y.npy` (memory-mapped: read as
indexed), `.pt`/`.pth` (dict of tensors `x`, `y`), `.csv` (numeric features, a target column by
name; indexed once, each row parsed when read) and an image folder (one sub-folder per class, each
image decoded when read, resized to `image_size` when given). Targets are class ids for
classification (string labels are numbered through the run config's `labels`, so every client
numbers them the same way) or float32 values for regression and multilabel tasks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedtrain.config import Config
from fedtrain.data.datasets import ArrayDataset, CsvDataset, Dataset, ImageFolderDataset
from fedtrain.errors import FedtrainError

BUILTIN = ("digits",)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
TABULAR_SUFFIXES = {".npz", ".pt", ".pth", ".csv"}
GREY_MODES = ("1", "L", "LA", "I", "I;16")
CHUNK = 4096  # rows checked at a time (memory-mapped arrays are scanned, never loaded whole)


# ---------------------------------------------------------------- loading


def load_builtin(name: str) -> Dataset:
    """A dataset that ships with a dependency (no download at run time)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # 8x8 grey images in [0, 1]
        return ArrayDataset(x, digits.target.astype(np.int64), [str(i) for i in range(10)])
    raise FedtrainError(f"unknown built-in dataset {name!r}; built-ins are: {', '.join(BUILTIN)}.")


def load_shard(
    path: str | Path, config: Config, *, infer_labels: bool = False, target_kind: str = "classes"
) -> Dataset:
    """Open one dataset file or folder (nothing more is read than it takes to index and check it).

    Args:
        path: the file or folder.
        config: the run's config (labels, label column, image size).
        infer_labels: number string labels in sorted order (used once, by the simulation, on the
            whole dataset); otherwise they must be listed in `config.data.labels`.
        target_kind: "classes" (class ids) or "values" (float32 targets: regression, multilabel).

    Returns:
        The shard.

    Raises:
        FedtrainError: one sentence for the first defect found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FedtrainError(f"data path {path} does not exist; check the path given with --data.")
    if path.is_dir() and (path / "x.npy").exists():
        x, raw = _read_npy_pair(path)
    elif path.is_dir():
        return _image_folder(path, config, infer_labels)
    elif path.suffix.lower() == ".npz":
        x, raw = _read_npz(path)
    elif path.suffix.lower() in (".pt", ".pth"):
        x, raw = _read_pt(path)
    elif path.suffix.lower() == ".csv":
        return _read_csv(path, config, infer_labels, target_kind)
    else:
        raise FedtrainError(
            f"cannot read {path}: unknown format {path.suffix or '(no suffix)'}; use .npz, .pt, .csv, a folder "
            "holding x.npy and y.npy, or a folder of images with one sub-folder per class."
        )
    if len(x) != len(raw):
        raise FedtrainError(f"{path} has {len(x)} samples but {len(raw)} labels; both must have one entry per sample.")
    if len(x) == 0:
        raise FedtrainError(f"{path} holds no samples; give a shard with at least one example.")
    _check_features(x, path)
    y, names = encode_targets(raw, config, str(path), infer_labels, target_kind)
    return ArrayDataset(x, y, names)


def encode_targets(
    raw: np.ndarray, config: Config, source: str, infer: bool, target_kind: str
) -> tuple[np.ndarray, list[str] | None]:
    """(targets, class names): class ids for "classes", float32 values (finite) for "values"."""
    if target_kind == "classes":
        return encode_labels(raw, config, source, infer=infer)
    try:
        values = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError):
        raise FedtrainError(f"targets in {source} are not numbers; this task needs numeric targets.") from None
    if not np.isfinite(values).all():
        raise FedtrainError(f"targets in {source} contain NaN or infinite values; clean the data first.")
    return values, None


def _read_npy_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """x.npy memory-mapped (read only as items are), y.npy loaded."""
    try:
        x = np.load(path / "x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(path / "y.npy", allow_pickle=False) if (path / "y.npy").exists() else None
    except ValueError as exc:
        raise FedtrainError(f"{path} holds an unreadable .npy file ({exc}); save plain numeric arrays.") from None
    if y is None:
        raise FedtrainError(f"{path} has x.npy but no y.npy; save the targets beside the features.")
    return x, y


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


def _read_csv(path: Path, config: Config, infer: bool, target_kind: str) -> Dataset:
    """Index a CSV shard in one streaming pass: every row checked, only its byte offset and target kept."""
    label_column = config.data.label_column
    offsets: list[int] = []
    labels: list[str] = []
    try:
        with path.open("rb") as handle:
            header_line = handle.readline()
            header = [cell.strip() for cell in next(csv.reader([header_line.decode("utf-8")]), [])]
            if not any(header):
                raise FedtrainError(f"{path} is empty; a CSV shard needs a header row and one row per sample.")
            if label_column not in header:
                raise FedtrainError(
                    f"{path} has no label column {label_column!r} (columns: {', '.join(header)}); "
                    "set label_column to the right name."
                )
            label_at = header.index(label_column)
            columns = [c for c in range(len(header)) if c != label_at]
            line_no = 1
            while True:
                offset = handle.tell()
                line = handle.readline()
                if not line:
                    break
                line_no += 1
                row = next(csv.reader([line.decode("utf-8")]), [])
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise FedtrainError(f"{path} line {line_no} has {len(row)} fields, the header has {len(header)}.")
                for col in columns:
                    try:
                        value = float(row[col])
                    except ValueError:
                        raise FedtrainError(
                            f"{path} line {line_no}, column {header[col]!r}: {row[col]!r} is not a number; "
                            "CSV features must be numeric."
                        ) from None
                    if not np.isfinite(value):
                        raise FedtrainError(f"features in {path} contain NaN or infinite values; clean the data first.")
                offsets.append(offset)
                labels.append(row[label_at].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FedtrainError(f"{path} is not a readable CSV file ({exc}).") from None
    if not offsets:
        raise FedtrainError(f"{path} has a header but no rows; a CSV shard needs one row per sample.")
    y, names = encode_targets(np.asarray(labels), config, str(path), infer, target_kind)
    return CsvDataset(path, np.asarray(offsets, dtype=np.int64), columns, y, names)


def _image_folder(path: Path, config: Config, infer: bool) -> Dataset:
    """Index an image folder: every file's header read (kind, mode, size), no pixels decoded."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FedtrainError(f"image folder {path} has no class sub-folders; put each class's images in its own.")
    files, labels, sizes, grey = [], [], set(), True
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:  # reads the header only
                    sizes.add(img.size)
                    grey = grey and img.mode in GREY_MODES
            except (UnidentifiedImageError, OSError) as exc:
                raise FedtrainError(f"image {file} cannot be read ({type(exc).__name__}); remove or fix it.") from None
            files.append(file)
            labels.append(folder.name)
    if not files:
        raise FedtrainError(f"image folder {path} holds no PNG or JPEG images.")
    size = tuple(config.data.image_size) if config.data.image_size else None
    if size is None and len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise FedtrainError(
            f"images in {path} have different sizes ({a[0]}x{a[1]} and {b[0]}x{b[1]}); set image_size "
            "(e.g. --image-size 32 32) to resize them to one, or resize the files."
        )
    y, names = encode_labels(np.asarray(labels), config, str(path), infer=infer)
    return ImageFolderDataset(files, y, names, "L" if grey else "RGB", size)  # type: ignore[arg-type]


def _check_features(x: np.ndarray, source: Path) -> None:
    """Numeric, and (for floats) finite, checked in chunks so a memory-mapped file is never loaded whole."""
    if x.dtype != bool and not np.issubdtype(x.dtype, np.number):
        raise FedtrainError(f"features in {source} are not numeric (dtype {x.dtype}); convert them to numbers.")
    if np.issubdtype(x.dtype, np.floating):
        for start in range(0, len(x), CHUNK):
            if not np.isfinite(x[start : start + CHUNK]).all():
                raise FedtrainError(f"features in {source} contain NaN or infinite values; clean the data first.")


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
        negative = next((name for name in shard.class_names or [] if _is_int(name) and int(name) < 0), None)
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


def load_source(config: Config, target_kind: str = "classes") -> Dataset:
    """The whole dataset a simulation splits: a built-in name or a file/folder."""
    if config.data.source in BUILTIN:
        return load_builtin(config.data.source)
    return load_shard(config.data.source, config, infer_labels=config.data.labels is None, target_kind=target_kind)
