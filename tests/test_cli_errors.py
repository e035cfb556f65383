"""Every input a user can get wrong: one sentence on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedtrain.security.keys import encode_key, write_key_file
from fedtrain.server.model_files import MODEL_FILE, RUN_FILE, save_model
from tests.conftest import run_cli, run_cli_process


def _assert_user_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert message in " ".join(err.split()), err


def _bad_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


SIMULATE_CASES = {
    "missing data": (lambda d: ["--data", str(d / "missing.npz")], "does not exist"),
    "unknown format": (lambda d: ["--data", str((d / "x.xlsx").write_bytes(b"1") and d / "x.xlsx")], "unknown format"),
    "mismatched lengths": (
        lambda d: ["--data", _bad_npz(d / "m.npz", x=np.zeros((50, 4)), y=np.zeros(49, int))],
        "50 samples but 49 labels",
    ),
    "empty shard": (lambda d: ["--data", _bad_npz(d / "e.npz", x=np.zeros((0, 4)), y=np.zeros(0, int))], "no samples"),
    "non-numeric csv": (
        lambda d: ["--data", str((d / "c.csv").write_text("a,label\n1,0\nx,1\n") and d / "c.csv")],
        "'x' is not a number",
    ),
    "labels out of range": (
        lambda d: [
            "--data",
            _bad_npz(d / "r.npz", x=np.zeros((40, 4)), y=np.arange(40) % 5),
            "--config",
            str((d / "c.toml").write_text("num_classes = 3\n") and d / "c.toml"),
        ],
        "out of range",
    ),
    "too many clients": (lambda d: ["--clients", "5000"], "cannot feed 5000 clients"),
    "bad option value": (lambda d: ["--partition", "zipf"], "partition must be one of iid, dirichlet"),
    "both privacy knobs": (
        lambda d: [
            "--config",
            str((d / "c.toml").write_text("noise_multiplier = 1.0\n") and d / "c.toml"),
            "--target-epsilon",
            "2",
            "--noise-multiplier",
            "1",
        ],
        "either target_epsilon or noise_multiplier",
    ),
    "unknown model": (lambda d: ["--model", "gpt"], "unknown model 'gpt'"),
    "incompatible model": (
        lambda d: ["--model", "cnn", "--data", _bad_npz(d / "t.npz", x=np.zeros((40, 4)), y=np.arange(40) % 2)],
        "needs images",
    ),
    "missing CUDA": (lambda d: ["--device", "cuda"], "CUDA is not available"),
    "unknown strategy": (lambda d: ["--strategy", "fedsgd"], "unknown strategy 'fedsgd'; choose one of fedavg"),
    "krum beyond its bound": (
        lambda d: [
            "--strategy",
            "krum",
            "--config",
            str((d / "k.toml").write_text("num_malicious = 2") and d / "k.toml"),
        ],
        "krum with num_malicious = 2 needs at least 7 clients per round, this run has 5",
    ),
    "unknown compression": (lambda d: ["--compression", "int3"], "compression must be one of none, int8"),
    "quantised updates under SecAgg+": (
        lambda d: ["--compression", "int8", "--secure-aggregation"],
        "compression = int8 cannot be used with secure_aggregation",
    ),
    "bad config file": (
        lambda d: ["--config", str((d / "b.toml").write_text("rounds = [") and d / "b.toml")],
        "not valid TOML",
    ),
}


@pytest.mark.parametrize("case", sorted(SIMULATE_CASES))
def test_simulate_bad_input(tmp_path, capsys, case: str) -> None:
    if case == "missing CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_args, message = SIMULATE_CASES[case]
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["simulate", "--run-dir", str(run_dir), *make_args(tmp_path)], capsys)
    _assert_user_error(code, err, message)
    assert not run_dir.exists()  # nothing half-written


def test_run_dir_that_holds_a_run_is_never_overwritten(tmp_path, capsys) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("[]")
    code, _, err = run_cli(["simulate", "--run-dir", str(tmp_path / "old")], capsys)
    _assert_user_error(code, err, "is not empty")
    assert (tmp_path / "old" / "metrics.json").read_text() == "[]"


@pytest.fixture
def encrypted_run(tmp_path):
    """A run directory with an encrypted final model, written by fedtrain's own writer."""
    key = os.urandom(32)
    key_file = write_key_file(tmp_path / "keys" / "model.key", key)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_FILE).write_text('{"run_id": "r1"}')
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_model(run_dir / MODEL_FILE, state, key, "r1", "model", {"round": 4})
    return run_dir, key_file, key


def test_export_round_trip(encrypted_run, capsys) -> None:
    run_dir, key_file, _ = encrypted_run
    out = run_dir.parent / "plain.pt"
    code, stdout, err = run_cli(["export", str(run_dir), "--out", str(out), "--key-file", str(key_file)], capsys)
    assert code == 0, err
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))
    assert "not encrypted" in stdout


def test_export_with_wrong_key(encrypted_run, capsys, monkeypatch) -> None:
    run_dir, _, _ = encrypted_run
    monkeypatch.setenv("FEDTRAIN_MODEL_KEY", encode_key(os.urandom(32)))
    out = run_dir.parent / "plain.pt"
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out)], capsys)
    _assert_user_error(code, err, "was encrypted with a different key")
    assert not out.exists()


def test_export_of_a_tampered_model(encrypted_run, capsys) -> None:
    run_dir, key_file, _ = encrypted_run
    data = bytearray((run_dir / MODEL_FILE).read_bytes())
    data[-5] ^= 0x01
    (run_dir / MODEL_FILE).write_bytes(bytes(data))
    out = run_dir.parent / "plain.pt"
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out), "--key-file", str(key_file)], capsys)
    _assert_user_error(code, err, "failed authentication: it was modified")
    assert not out.exists()


def test_export_of_a_model_moved_to_another_run(encrypted_run, capsys) -> None:
    run_dir, key_file, _ = encrypted_run
    (run_dir / RUN_FILE).write_text('{"run_id": "r2"}')
    code, _, err = run_cli(
        ["export", str(run_dir), "--out", str(run_dir / "p.pt"), "--key-file", str(key_file)], capsys
    )
    _assert_user_error(code, err, "belongs to another run")


def test_export_refuses_to_overwrite(encrypted_run, capsys) -> None:
    run_dir, key_file, _ = encrypted_run
    out = run_dir.parent / "plain.pt"
    out.write_text("keep me")
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out), "--key-file", str(key_file)], capsys)
    _assert_user_error(code, err, "already exists")
    assert out.read_text() == "keep me"


def test_export_of_something_that_is_not_a_run(tmp_path, capsys) -> None:
    code, _, err = run_cli(["export", str(tmp_path), "--out", str(tmp_path / "p.pt")], capsys)
    _assert_user_error(code, err, "is not a fedtrain run directory")


def test_real_console_script_prints_one_sentence(tmp_path) -> None:
    result = run_cli_process(["simulate", "--data", str(tmp_path / "none.npz")], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) <= 2
