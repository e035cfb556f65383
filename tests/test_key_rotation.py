"""Key rotation: a run's model and checkpoint re-encrypted under a new model key, all or nothing
from the user's point of view, and resumable when interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtrain.server.key_rotation as key_rotation
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import generate_key, load_model_key, write_key_file
from fedtrain.server.loop import Federation
from fedtrain.server.model_files import load_model
from tests.conftest import run_cli
from tests.test_resume import Killed, controlled, kill_after
from tests.test_strategies import ControlledGrid, task_identity  # noqa: F401 (fixture)


@pytest.fixture
def finished(tmp_path):
    config = controlled(tmp_path, rounds=2)
    Federation(config, on_round=lambda row: None).run(ControlledGrid())
    return config, Path(config.deployment.run_dir)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.glob("*.ftenc")}


def test_rotation_reseals_every_file_under_the_new_key(finished, tmp_path) -> None:
    config, run_dir = finished
    old, new_path = load_model_key(config.deployment.key_file), write_key_file(tmp_path / "new.key", generate_key())
    before = _files(run_dir)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    rotated = key_rotation.rotate_run_key(run_dir, old, load_model_key(str(new_path)))
    assert sorted(p.name for p in rotated) == ["checkpoint.ftenc", "model.ftenc"]
    after = _files(run_dir)
    assert all(after[name] != before[name] for name in before)
    state, _ = load_model(run_dir / "model.ftenc", load_model_key(str(new_path)).key, run_id, "model")
    with pytest.raises(FedtrainError):
        load_model(run_dir / "model.ftenc", old.key, run_id, "model")
    assert json.loads((run_dir / "run.json").read_text())["key_id"] == load_model_key(str(new_path)).key_id
    assert f'key_file = "{new_path}"' in (run_dir / "config.toml").read_text()


def test_a_wrong_old_key_changes_nothing(finished, tmp_path) -> None:
    config, run_dir = finished
    before = _files(run_dir), (run_dir / "run.json").read_text()
    wrong = load_model_key(str(write_key_file(tmp_path / "wrong.key", generate_key())))
    new = load_model_key(str(write_key_file(tmp_path / "new.key", generate_key())))
    with pytest.raises(FedtrainError, match="give the run's current key"):
        key_rotation.rotate_run_key(run_dir, wrong, new)
    assert (_files(run_dir), (run_dir / "run.json").read_text()) == before


def test_an_interrupted_rotation_is_finished_by_running_it_again(finished, tmp_path, monkeypatch) -> None:
    config, run_dir = finished
    old = load_model_key(config.deployment.key_file)
    new = load_model_key(str(write_key_file(tmp_path / "new.key", generate_key())))
    real, written = key_rotation.write_encrypted, []

    def dies_after_one(*args, **kwargs):
        if written:
            raise Killed
        written.append(real(*args, **kwargs))

    monkeypatch.setattr(key_rotation, "write_encrypted", dies_after_one)
    with pytest.raises(Killed):
        key_rotation.rotate_run_key(run_dir, old, new)
    monkeypatch.setattr(key_rotation, "write_encrypted", real)
    key_rotation.rotate_run_key(run_dir, old, new)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    for name, kind in (("model.ftenc", "model"), ("checkpoint.ftenc", "checkpoint")):
        load_model(run_dir / name, new.key, run_id, kind)


def test_cli_rotation_then_resume_and_export_use_the_new_key(tmp_path, capsys) -> None:
    config = controlled(tmp_path)
    with pytest.raises(Killed):
        Federation(config, on_round=kill_after(2)).run(ControlledGrid())
    new_key = tmp_path / "rotated.key"
    code, out, err = run_cli(["rotate-key", config.deployment.run_dir, "--new-key-file", str(new_key)], capsys)
    assert code == 0, err
    assert "re-encrypted 1 files" in out and new_key.exists()
    resumed = config.replace(key_file=str(new_key))
    Federation(resumed, on_round=lambda row: None, resume=True).run(ControlledGrid())
    code, out, err = run_cli(["export", config.deployment.run_dir, "--out", str(tmp_path / "plain.pt")], capsys)
    assert code == 0, err  # the run's config.toml now names the new key
