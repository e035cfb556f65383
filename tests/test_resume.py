"""Crash-safe resume: a server killed after round k continues from its last checkpoint, losing no
completed round, and a resume with another config or key is refused.

The server's "kill" is an exception raised out of the round loop right after round k's checkpoint
(k drawn per test run from a seed printed in the failure message), so nothing after it runs. The
files are written atomically, so a real SIGKILL can only leave the previous checkpoint or this one;
test_a_crash_while_writing_the_checkpoint_keeps_the_previous_one covers the moment in between.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import generate_key, load_model_key, write_key_file
from fedtrain.server.checkpoint import preflight
from fedtrain.server.loop import Federation
from fedtrain.simulation import prepare
from tests.conftest import run_cli
from tests.inprocess import AppGrid
from tests.test_strategies import ControlledGrid, task_identity  # noqa: F401 (fixture)

SEED = int(os.environ.get("FEDTRAIN_FAULT_SEED", random.SystemRandom().randrange(10**6)))


class Killed(Exception):
    """The server process dies here."""


def kill_after(k: int):
    def on_round(row):
        if row["round"] == k:
            raise Killed

    return on_round


def controlled(tmp_path, **options) -> Config:
    key = write_key_file(tmp_path / "model.key", generate_key())
    return Config(clients=7, rounds=5, input_shape=[4], num_classes=3, fraction_evaluate=0.0, fraction_train=0.6,
                  run_dir=str(tmp_path / "run"), key_file=str(key), strategy="fedadam", server_lr=0.05,
                  seed=SEED).replace(**options)  # fmt: skip


def test_resumed_server_state_is_exactly_the_uninterrupted_one(tmp_path) -> None:
    """Deterministic client updates, FedAdam (moments), 60% of the clients sampled per round (the
    RNG): a run killed after round k and resumed sends every node the same weights, round by round,
    as one that never stopped."""
    k = random.Random(SEED).randint(1, 4)
    whole = ControlledGrid()
    Federation(controlled(tmp_path / "a"), on_round=lambda row: None).run(whole)

    config = controlled(tmp_path / "b")
    broken = ControlledGrid()
    with pytest.raises(Killed):
        Federation(config, on_round=kill_after(k)).run(broken)
    resumed = ControlledGrid()
    rows = Federation(config, on_round=lambda row: None, resume=True).run(resumed)

    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5], f"seed {SEED}, k {k}"
    assert sorted(resumed.sent) == list(range(k + 1, 6))  # the resumed run started after round k
    for server_round in range(1, 6):
        sent = (broken if server_round <= k else resumed).sent[server_round]
        for name, value in whole.sent[server_round].items():
            np.testing.assert_array_equal(sent[name], value, err_msg=f"round {server_round}, seed {SEED}, k {k}")
    assert json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())[k - 1]["round"] == k


def test_a_resumed_simulation_continues_every_clients_ledger(tmp_path) -> None:
    """Real clients (DP-SGD, RDP ledger) lose their memory with the server: their ledgers come back
    from their own encrypted files, so each ends with exactly one ledger entry per round."""
    k = random.Random(SEED).randint(1, 3)
    key = write_key_file(tmp_path / "model.key", generate_key())
    config, test_set = prepare(
        Config(
            clients=3,
            rounds=4,
            noise_multiplier=1.0,
            target_epsilon=None,
            accountant="rdp",
            fraction_evaluate=0.0,
            run_dir=str(tmp_path / "run"),
            key_file=str(key),
        )  # fmt: skip
    )
    ledger_key = load_model_key(str(key)).key
    with pytest.raises(Killed):
        Federation(config, test_set=test_set, on_round=kill_after(k)).run(AppGrid(config, ledger_key=ledger_key))
    rows = Federation(config, test_set=test_set, on_round=lambda row: None, resume=True).run(
        AppGrid(config, ledger_key=ledger_key)  # new nodes: nothing in memory
    )
    assert [row["clients_ok"] for row in rows] == [3, 3, 3, 3], f"seed {SEED}, k {k}"
    assert rows[-1]["accuracy"] > 0.5
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())["clients"]
    for name, client in privacy.items():
        kinds = [e["kind"] for e in client["ledger"]]
        assert kinds == ["train", "metrics"] * 4, f"{name}, seed {SEED}, k {k}"  # each round and its loss, once
        reference = RDPAccountant()
        reference.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in client["ledger"]]
        assert client["epsilon"] == pytest.approx(reference.get_epsilon(delta=client["delta"]), rel=1e-6)


def test_a_crash_while_writing_the_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    config = controlled(tmp_path)
    real_replace, calls = os.replace, []

    def dies_on_the_third_checkpoint(src, dst):
        calls.append(dst)
        if str(dst).endswith("checkpoint.ftenc") and sum(str(c).endswith("checkpoint.ftenc") for c in calls) == 3:
            raise Killed  # the temp file is written, the rename never happens
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_third_checkpoint)
    with pytest.raises(Killed):
        Federation(config, on_round=lambda row: None).run(ControlledGrid())
    monkeypatch.setattr(os, "replace", real_replace)
    assert preflight(config) == 2  # round 3's checkpoint never replaced round 2's
    rows = Federation(config, on_round=lambda row: None, resume=True).run(ControlledGrid())
    assert [row["round"] for row in rows] == [1, 2, 3, 4, 5]


@pytest.fixture
def interrupted(tmp_path) -> Config:
    config = controlled(tmp_path)
    with pytest.raises(Killed):
        Federation(config, on_round=kill_after(2)).run(ControlledGrid())
    return config


def test_resume_with_another_config_is_refused(interrupted) -> None:
    with pytest.raises(FedtrainError, match=r"another configuration \(server_lr \(0.05 then, 0.1 now\)\)"):
        preflight(interrupted.replace(server_lr=0.1))


def test_resume_with_another_key_is_refused(interrupted, tmp_path) -> None:
    other = write_key_file(tmp_path / "other.key", generate_key())
    with pytest.raises(FedtrainError, match="was encrypted with key .* resume it with its own key"):
        preflight(interrupted.replace(key_file=str(other)))


def test_resume_of_a_tampered_checkpoint_is_refused(interrupted) -> None:
    path = Path(interrupted.deployment.run_dir) / "checkpoint.ftenc"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(FedtrainError, match="checkpoint.ftenc"):
        preflight(interrupted)


def test_a_finished_run_is_not_resumed(tmp_path) -> None:
    config = controlled(tmp_path)
    Federation(config, on_round=lambda row: None).run(ControlledGrid())
    with pytest.raises(FedtrainError, match="is complete"):
        preflight(config)


def test_cli_resume_refusals_are_one_sentence(interrupted, tmp_path, capsys) -> None:
    run_dir = interrupted.deployment.run_dir
    code, _, err = run_cli(["simulate", "--resume", run_dir, "--lr", "0.2"], capsys)
    assert code == 2 and "another configuration" in err and "Traceback" not in err
    code, _, err = run_cli(["simulate", "--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "is not a fedtrain run directory" in err
    code, _, err = run_cli(["simulate", "--resume", run_dir, "--run-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "not both" in err


def test_a_deployment_server_resumes_when_its_run_config_says_so(interrupted, tmp_path) -> None:
    """`fedtrain server --resume` writes `fedtrain-resume = true` into the run's app config; the
    deployed ServerApp (config from Flower's run config, as on a SuperLink) then continues the run."""
    from flwr.app import Context, RecordDict

    from fedtrain.server.app import build_server_app
    from fedtrain.server.deployment import write_app

    app_config = (write_app(tmp_path / "app", interrupted, resume=True) / "pyproject.toml").read_text()
    assert "fedtrain-resume = true" in app_config
    run_config = {**interrupted.to_run_config(), "fedtrain-resume": True}
    grid = ControlledGrid()
    build_server_app()(grid, Context(1, 0, {}, RecordDict(), run_config))
    assert sorted(grid.sent) == [3, 4, 5]  # rounds 1 and 2 were done before the interruption
    assert len(json.loads((Path(interrupted.deployment.run_dir) / "metrics.json").read_text())) == 5
