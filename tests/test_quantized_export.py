"""`fedtrain export --quantize int8`: the file is at most 0.3 of the float model's, its weights are the
symmetric per-block int8 quantisation of the run's (recomputed here in torch), and the accuracies it
prints are the server's own central evaluation (metrics.json) and the quantised model's."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.model_quantization import BLOCK, dequantize_state, load_quantized
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.server.history import METRICS_JSON
from fedtrain.server.model_files import RUN_FILE
from tests.conftest import run_cli
from tests.inprocess import run_federation
from tests.test_cli_errors import _assert_user_error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-round digits federation training the MLP, written by the server loop (central test split)."""
    tmp = tmp_path_factory.mktemp("run")
    key = write_key_file(tmp / "model.key", generate_key())
    run_federation(
        Config(
            clients=2,
            rounds=2,
            model="mlp",
            noise_multiplier=0.5,
            target_epsilon=None,
            fraction_evaluate=0.0,
            run_dir=str(tmp / "run"),
            key_file=str(key),
        )  # fmt: skip
    )
    return tmp / "run", key


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run_dir, key = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", key


def _export(run_dir, key, out, capsys, *extra: str) -> str:
    code, stdout, err = run_cli(["export", str(run_dir), "--out", str(out), "--key-file", str(key), *extra], capsys)
    assert code == 0, err
    return " ".join(stdout.split())


def _reference_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric round-to-nearest int8 per block of BLOCK values of the flattened tensor, written here."""
    flat = w.detach().double().flatten()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), BLOCK):
        block = flat[start : start + BLOCK]
        scale = float(torch.tensor(float(block.abs().max()) / 127, dtype=torch.float32))
        out[start : start + BLOCK] = torch.round(block / scale).clamp(-127, 127) * scale if scale > 0 else 0.0
    return out.reshape(w.shape).float()


def test_an_int8_export_is_under_0_3_of_float_with_both_accuracies(run_copy, capsys) -> None:
    run_dir, key = run_copy
    plain, small = run_dir.parent / "model.pt", run_dir.parent / "model.int8"
    _export(run_dir, key, plain, capsys)
    said = _export(run_dir, key, small, capsys, "--quantize", "int8")

    ratio = small.stat().st_size / plain.stat().st_size  # the two files on disk
    assert ratio <= 0.3, f"the int8 model is {ratio:.3f} of the float one"
    assert f"size: {small.stat().st_size:,} bytes, {ratio:.3f} of the float model's {plain.stat().st_size:,}" in said

    full = torch.load(plain, weights_only=True)
    shipped = load_quantized(small)
    assert list(shipped) == list(full)
    for name, w in full.items():
        assert shipped[name].dtype == w.dtype and shipped[name].shape == w.shape
        torch.testing.assert_close(shipped[name], _reference_int8(w), rtol=0, atol=1e-7)

    match = re.search(r"accuracy on the central test split: ([0-9.]+) \(int8\), ([0-9.]+) \(float\)", said)
    assert match, said
    quantised, float_accuracy = float(match.group(1)), float(match.group(2))
    final = json.loads((run_dir / METRICS_JSON).read_text())[-1]
    assert float_accuracy == pytest.approx(final["accuracy"], abs=5e-5)  # the server's evaluation during the run
    assert abs(quantised - float_accuracy) <= 0.02, said


def test_without_a_central_test_split_the_accuracy_is_not_invented(run_copy, capsys) -> None:
    run_dir, key = run_copy
    info = json.loads((run_dir / RUN_FILE).read_text())
    (run_dir / RUN_FILE).write_text(json.dumps({**info, "central_test_split": False}))  # as a deployment writes it
    said = _export(run_dir, key, run_dir.parent / "m.int8", capsys, "--quantize", "int8")
    assert "accuracy on the central test split: not available (the run has no central test split" in said


def test_an_unknown_quantisation_is_refused_and_nothing_written(run_copy, capsys) -> None:
    run_dir, key = run_copy
    out = run_dir.parent / "m.int4"
    code, _, err = run_cli(
        ["export", str(run_dir), "--out", str(out), "--key-file", str(key), "--quantize", "int4"], capsys
    )
    _assert_user_error(code, err, "--quantize must be one of int8, not 'int4'")
    assert not out.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"PK" + data[2:], "does not start as one"),
        (lambda data: data[:-10], "cut short"),
        (lambda data: data + b"\0", "bytes beyond its tensors"),
    ],
)
def test_a_damaged_int8_model_is_refused(damage, message: str) -> None:
    from fedtrain.model_quantization import quantized_bytes

    state = {"w": torch.randn(3, 70), "steps": torch.tensor(5)}
    data = quantized_bytes(state)
    assert torch.equal(dequantize_state(data)["steps"], torch.tensor(5))
    with pytest.raises(FedtrainError, match=message):
        dequantize_state(damage(data))


def test_a_missing_int8_model_is_one_sentence(tmp_path) -> None:
    with pytest.raises(FedtrainError, match="does not exist"):
        load_quantized(tmp_path / "none.int8")
