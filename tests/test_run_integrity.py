"""A run's plain files (metrics, privacy report, plot) are recorded under its model key: `fedtrain verify`
and `fedtrain export` say when one was edited, and a crash never makes an honest run look edited."""

from __future__ import annotations

import json
import os

import pytest

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.security import run_integrity as run_integrity_module
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.security.run_integrity import MANIFEST, RunIntegrity
from fedtrain.server.history import METRICS_CSV, METRICS_JSON, PLOT, PRIVACY_JSON, PROTECTED
from tests.conftest import run_cli
from tests.inprocess import AppGrid, flower_task
from tests.test_cli_errors import _assert_user_error

# ------------------------------------------------------------------ the record itself


@pytest.fixture
def record(tmp_path) -> RunIntegrity:
    integrity = RunIntegrity(tmp_path, os.urandom(32), "run-1")
    integrity.write({METRICS_JSON: b"[1]\n", METRICS_CSV: b"round\n1\n"})
    integrity.write({PRIVACY_JSON: b'{"epsilon": 1.0}\n'})
    return integrity


def test_files_as_written_verify(record) -> None:
    assert record.check(PROTECTED) == {METRICS_CSV: "ok", METRICS_JSON: "ok", PRIVACY_JSON: "ok"}
    record.write({METRICS_JSON: b"[1, 2]\n"})  # the next round
    assert record.require_intact(PROTECTED)[METRICS_JSON] == "ok"


@pytest.mark.parametrize(
    ("tamper", "state"),
    [
        (lambda d: (d / PRIVACY_JSON).write_bytes(b'{"epsilon": 0.1}\n'), {PRIVACY_JSON: "edited"}),
        (lambda d: (d / METRICS_JSON).unlink(), {METRICS_JSON: "deleted"}),
        (lambda d: (d / PLOT).write_bytes(b"\x89PNG fake"), {PLOT: "not recorded"}),
    ],
    ids=["edited", "deleted", "added"],
)
def test_every_change_behind_fedtrains_back_is_named(record, tmp_path, tamper, state) -> None:
    tamper(tmp_path)
    assert {k: v for k, v in record.check(PROTECTED).items() if v != "ok"} == state
    ((name, what),) = state.items()
    with pytest.raises(FedtrainError, match=f"{name} \\({what}\\); do not trust this run's reports"):
        record.require_intact(PROTECTED)


def test_the_record_cannot_be_edited_moved_or_opened_with_another_key(record, tmp_path) -> None:
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["files"][PRIVACY_JSON] = ["0" * 64]  # someone blesses their own privacy.json
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FedtrainError, match="integrity.json was edited after fedtrain wrote it"):
        record.check(PROTECTED)
    with pytest.raises(FedtrainError, match="was sealed with key .*, not with the key given"):
        RunIntegrity(tmp_path, os.urandom(32), "run-1").check(PROTECTED)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(FedtrainError, match=f"has no {MANIFEST}, so metrics.csv, metrics.json, privacy.json cannot"):
        record.check(sorted(PROTECTED))


def test_a_record_of_another_run_is_refused(record, tmp_path) -> None:
    RunIntegrity(tmp_path, b"k" * 32, "run-2").write({METRICS_JSON: b"[1]\n"})  # another run's record, same key
    with pytest.raises(FedtrainError, match="belongs to run run-2, not to this run"):
        RunIntegrity(tmp_path, b"k" * 32, "run-1").check(PROTECTED)


@pytest.mark.parametrize("crash_at", ["before the files", "after the files"])
def test_a_crash_at_any_step_leaves_an_honest_run_verifiable(record, tmp_path, monkeypatch, crash_at) -> None:
    class Crash(Exception):
        pass

    real_write, real_save = run_integrity_module.atomic_write_bytes, RunIntegrity._save
    saves = []

    def write(path, data, mode=0o644):
        if crash_at == "before the files":
            raise Crash
        return real_write(path, data, mode)

    def save(self, files):
        saves.append(files)
        if crash_at == "after the files" and len(saves) == 2:
            raise Crash
        real_save(self, files)

    monkeypatch.setattr(run_integrity_module, "atomic_write_bytes", write)
    monkeypatch.setattr(RunIntegrity, "_save", save)
    with pytest.raises(Crash):
        record.write({METRICS_JSON: b"[1, 2]\n", PLOT: b"\x89PNG first plot"})  # PLOT: its first version
    monkeypatch.undo()
    assert set(record.check(PROTECTED).values()) == {"ok"}
    expected = b"[1]\n" if crash_at == "before the files" else b"[1, 2]\n"
    assert (tmp_path / METRICS_JSON).read_bytes() == expected


def test_writing_over_an_edited_file_never_blesses_the_edit(record, tmp_path, monkeypatch) -> None:
    (tmp_path / PRIVACY_JSON).write_bytes(b'{"epsilon": 0.1}\n')  # edited between two rounds

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_integrity_module, "atomic_write_bytes", crash)
    with pytest.raises(OSError):
        record.write({PRIVACY_JSON: b'{"epsilon": 1.5}\n'})  # the server dies before writing the next version
    monkeypatch.undo()
    assert record.check(PROTECTED)[PRIVACY_JSON] == "edited"


# ------------------------------------------------------------------ a real run, `verify` and `export`


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-round digits federation of real clients (DP-SGD, ledgers), written by the server loop."""
    from fedtrain.server.loop import Federation
    from fedtrain.simulation import prepare

    tmp = tmp_path_factory.mktemp("run")
    key = write_key_file(tmp / "model.key", generate_key())
    config, test_set = prepare(
        Config(
            clients=2,
            rounds=2,
            noise_multiplier=1.0,
            target_epsilon=None,
            fraction_evaluate=0.0,
            run_dir=str(tmp / "run"),
            key_file=str(key),
        )  # fmt: skip
    )
    with flower_task():
        Federation(config, test_set=test_set, on_round=lambda row: None).run(AppGrid(config))
    return tmp / "run", key


@pytest.fixture
def run_copy(finished_run, tmp_path):
    import shutil

    run_dir, key = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy, key


def test_an_untouched_run_verifies_and_exports(run_copy, capsys) -> None:
    run_dir, key = run_copy
    assert {p.name for p in run_dir.iterdir()} >= {*PROTECTED, MANIFEST}  # the last round wrote the plot
    code, out, err = run_cli(["verify", str(run_dir), "--key-file", str(key)], capsys)
    assert code == 0, err
    for name in (*PROTECTED, "model.ftenc", "checkpoint.ftenc"):
        assert f"{name}: ok" in out
    code, _, err = run_cli(["export", str(run_dir), "--out", str(run_dir.parent / "m.pt"), "--key-file", str(key)],
                           capsys)  # fmt: skip
    assert code == 0, err


def _edit_epsilon(run_dir) -> None:
    report = json.loads((run_dir / PRIVACY_JSON).read_text())
    for client in report["clients"].values():
        client["epsilon"] = client["epsilon"] / 10  # a nicer number
    (run_dir / PRIVACY_JSON).write_text(json.dumps(report, indent=2) + "\n")


def _edit_accuracy(run_dir) -> None:
    rows = json.loads((run_dir / METRICS_JSON).read_text())
    rows[-1]["accuracy"] = 0.99
    (run_dir / METRICS_JSON).write_text(json.dumps(rows, indent=2) + "\n")


@pytest.mark.parametrize(("edit", "name"), [(_edit_epsilon, PRIVACY_JSON), (_edit_accuracy, METRICS_JSON)])
def test_verify_and_export_say_when_a_report_was_edited(run_copy, capsys, edit, name) -> None:
    run_dir, key = run_copy
    edit(run_dir)
    code, out, err = run_cli(["verify", str(run_dir), "--key-file", str(key)], capsys)
    _assert_user_error(code, err, f"1 of 6 files of {run_dir} are not as fedtrain wrote them: {name} (edited)")
    assert f"{name}: edited" in out
    out_file = run_dir.parent / "m.pt"
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out_file), "--key-file", str(key)], capsys)
    _assert_user_error(code, err, f"{name} (edited); do not trust this run's reports")
    assert not out_file.exists()


def test_a_rotated_key_keeps_the_run_verifiable(run_copy, tmp_path, capsys) -> None:
    run_dir, key = run_copy
    new_key = tmp_path / "new.key"
    code, _, err = run_cli(["rotate-key", str(run_dir), "--new-key-file", str(new_key), "--key-file", str(key)],
                           capsys)  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(["verify", str(run_dir), "--key-file", str(new_key)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["verify", str(run_dir), "--key-file", str(key)], capsys)
    _assert_user_error(code, err, "is sealed with key")
