"""Loading private shards in every supported format, and a clear sentence for every bad one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedtrain.config import Config
from fedtrain.data import load_builtin, load_shard
from fedtrain.errors import FedtrainError


def arrays(ds):
    """Every record of a lazily read dataset, as fedtrain's models see them: (features, targets)."""
    return ds.batch(np.arange(len(ds)))


CFG = Config()


def test_npz_uint8_channel_less_images_are_scaled_and_get_a_channel(tmp_path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(10, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(10) % 3)
    ds = load_shard(tmp_path / "s.npz", CFG)
    assert arrays(ds)[0].dtype == np.float32 and arrays(ds)[0].shape == (10, 1, 6, 6)
    assert arrays(ds)[0].max() <= 1.0 and np.allclose(arrays(ds)[0][0, 0], x[0] / 255.0)
    assert arrays(ds)[1].tolist() == (np.arange(10) % 3).tolist() and ds.num_classes == 3


def test_channels_last_images_become_channel_first(tmp_path) -> None:
    x = np.zeros((4, 5, 7, 3), dtype=np.uint8)
    x[:, :, :, 1] = 255
    np.savez(tmp_path / "rgb.npz", x=x, y=[0, 1, 0, 1])
    ds = load_shard(tmp_path / "rgb.npz", CFG)
    assert ds.input_shape == [3, 5, 7]
    assert arrays(ds)[0][:, 1].min() == 1.0 and arrays(ds)[0][:, 0].max() == 0.0


def test_pt_dict_of_tensors(tmp_path) -> None:
    torch.save({"x": torch.randn(8, 4), "y": torch.tensor([0, 1] * 4)}, tmp_path / "s.pt")
    ds = load_shard(tmp_path / "s.pt", CFG)
    assert arrays(ds)[0].shape == (8, 4) and arrays(ds)[1].dtype == np.int64


def test_csv_with_string_labels_mapped_through_config(tmp_path) -> None:
    (tmp_path / "s.csv").write_text("a,b,kind\n1,2,cat\n3,4,dog\n5,6,cat\n")
    config = Config(label_column="kind", labels=["dog", "cat"])
    ds = load_shard(tmp_path / "s.csv", config)
    assert arrays(ds)[0].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert arrays(ds)[1].tolist() == [1, 0, 1]  # the config's order, the same on every client
    assert ds.class_names == ["dog", "cat"]


def test_image_folder(tmp_path) -> None:
    for cls, shade in (("ants", 10), ("bees", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (5, 4), color=shade + i).save(tmp_path / cls / f"{i}.png")
    ds = load_shard(tmp_path, Config(labels=["ants", "bees"]))
    assert arrays(ds)[0].shape == (6, 1, 4, 5) and arrays(ds)[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert arrays(ds)[0][0].max() == pytest.approx(10 / 255)


def test_builtin_digits() -> None:
    ds = load_builtin("digits")
    assert arrays(ds)[0].shape == (1797, 1, 8, 8) and ds.num_classes == 10 and arrays(ds)[0].max() == 1.0


def _npz(tmp_path, name="s.npz", **arrays):
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def _write(path, content: bytes | str):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


BAD_INPUTS = {
    "missing path": (lambda p: p / "nope.npz", "does not exist"),
    "unknown format": (lambda p: _write(p / "data.parquet", b"x"), "unknown format"),
    "mismatched lengths": (lambda p: _npz(p, x=np.zeros((5, 2)), y=np.zeros(4, int)), "5 samples but 4 labels"),
    "no y array": (lambda p: _npz(p, x=np.zeros((5, 2))), "no array 'y'"),
    "empty shard": (lambda p: _npz(p, x=np.zeros((0, 2)), y=np.zeros(0, int)), "holds no samples"),
    "labels out of range": (
        lambda p: _npz(p, x=np.zeros((3, 2)), y=np.array([0, 1, 7])),
        "label 7 .* out of range",
    ),
    "negative label": (lambda p: _npz(p, x=np.zeros((2, 2)), y=np.array([0, -1])), "out of range"),
    "non-numeric csv": (
        lambda p: _write(p / "s.csv", "a,label\n1,0\nhello,1\n"),
        "'hello' is not a number",
    ),
    "csv without label column": (lambda p: _write(p / "s.csv", "a,b\n1,0\n"), "no label column"),
    "string labels without config": (
        lambda p: _npz(p, x=np.zeros((2, 2)), y=np.array(["cat", "dog"])),
        "list every class in the config",
    ),
    "nan features": (lambda p: _npz(p, x=np.array([[np.nan, 1.0]]), y=np.array([0])), "NaN or infinite"),
    "pickled objects": (
        lambda p: _npz(p, x=np.array([object(), object()], dtype=object), y=np.array([0, 1])),
        "never unpickles",
    ),
    "corrupt npz": (lambda p: _write(p / "s.npz", b"PK\x03\x04garbage"), "not a readable"),
    "corrupt pt": (lambda p: _write(p / "s.pt", b"garbage"), "not a readable tensor file"),
    "empty image folder": (lambda p: (p / "imgs" / "a").mkdir(parents=True) or p / "imgs", "no PNG or JPEG"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_sentence(tmp_path, case: str) -> None:
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(FedtrainError, match=message) as info:
        load_shard(path, Config(num_classes=3) if case == "labels out of range" else CFG)
    assert "\n" not in str(info.value)


def test_unknown_configured_label(tmp_path) -> None:
    path = _npz(tmp_path, x=np.zeros((2, 2)), y=np.array(["cat", "emu"]))
    with pytest.raises(FedtrainError, match="'emu' .* not one of the configured labels"):
        load_shard(path, Config(labels=["cat", "dog"]))
