"""`--track mlflow` / `--track tensorboard`: one record per fedtrain run holding every round's
metrics and epsilons, the configuration and the report (never the model), read back through
MLflow's and TensorBoard's own APIs; a tracker never stops a run that has spent privacy."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.server.observers.tracking import Tracking
from fedtrain.server.tracking import make_trackers, round_metrics
from fedtrain.server.tracking.base import Tracker
from tests.conftest import mlflow_store, run_cli
from tests.test_cli_errors import _assert_user_error
from tests.test_strategies import task_identity  # noqa: F401 (fixture)


def _mlflow_runs(store: Path, run_id: str) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedtrain")
    assert experiment is not None
    return client, client.search_runs([experiment.experiment_id], filter_string=f"tags.`fedtrain.run_id` = '{run_id}'")


def _assert_every_round(client, mlflow_run, rows: list[dict], privacy: dict) -> None:
    def history(name):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(mlflow_run, name), key=lambda m: m.step)]

    assert history("accuracy") == [(row["round"], pytest.approx(row["accuracy"])) for row in rows]
    assert history("epsilon_max") == [(row["round"], pytest.approx(row["epsilon_max"])) for row in rows]
    for cid in privacy["clients"]:
        assert history(f"epsilon/{cid}") == [(row["round"], pytest.approx(row["epsilon"][cid])) for row in rows]
    assert history("clients_ok") == [(row["round"], row["clients_ok"]) for row in rows]


def test_mlflow_holds_one_run_per_fedtrain_run_with_every_round(tracked_demo_run, empty_mlflow_store, tmp_path, capsys):
    run_dir, store = tracked_demo_run["run_dir"], tracked_demo_run["mlruns"]
    rows = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    client, runs = _mlflow_runs(store, run_id)  # logged live, round by round, by the server loop's observer
    assert len(runs) == 1
    (mlflow_run,) = runs
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == run_dir.name
    _assert_every_round(client, mlflow_run.info.run_id, rows, privacy)
    assert mlflow_run.data.params["privacy.target_epsilon"] == "3.0"
    assert mlflow_run.data.params["federation.clients"] == "5"
    assert "epsilon <= " in mlflow_run.data.tags["mlflow.note.content"]
    artifacts = [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
    assert artifacts == ["report.html"]  # the report; never the model, in any form
    downloaded = Path(client.download_artifacts(mlflow_run.info.run_id, "report.html", str(tmp_path)))
    assert downloaded.read_bytes() == (run_dir / "report.html").read_bytes()

    # the same run reported again adds nothing but the report: still one MLflow run, each round once
    argv = ["report", str(run_dir), "--out", str(tmp_path / "again.html"), "--key-file", str(tracked_demo_run["key"])]
    code, out, err = run_cli([*argv, "--track", "mlflow", "--mlflow-uri", str(store)], capsys)
    assert code == 0, err
    assert "logged 0 rounds" in out and "(3 were there already)" in out
    client, runs = _mlflow_runs(store, run_id)
    assert len(runs) == 1
    _assert_every_round(client, runs[0].info.run_id, rows, privacy)

    # a run that was never tracked is logged afterwards from its verified files
    fresh = mlflow_store(empty_mlflow_store, tmp_path / "fresh-store")
    code, out, err = run_cli([*argv, "--track", "mlflow", "--mlflow-uri", str(fresh)], capsys)
    assert code == 0, err
    assert "mlflow: logged 3 rounds" in out
    client, runs = _mlflow_runs(fresh, run_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _assert_every_round(client, runs[0].info.run_id, rows, privacy)
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["again.html"]


def test_tensorboard_event_files_hold_every_round(tracked_demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_demo_run["run_dir"]
    rows = json.loads((run_dir / "metrics.json").read_text())
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"accuracy", "loss", "epsilon_max", "train_loss", "clients_ok", "seconds"} <= scalars
    expected = {"accuracy": [r["accuracy"] for r in rows], "epsilon_max": [r["epsilon_max"] for r in rows]}
    expected.update({f"epsilon/{cid}": [r["epsilon"][cid] for r in rows] for cid in rows[-1]["epsilon"]})
    for tag, values in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["round"], pytest.approx(v, rel=1e-6)) for r, v in zip(rows, values, strict=True)], tag
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "report/text_summary"} <= texts
    report = events.Tensors("report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "report.html" in report and "No audit was run." in report


def test_round_metrics_name_the_tasks_headline_metric_and_skip_missing_values():
    row = {"round": 2, "metric": "r2", "accuracy": 0.7, "loss": float("nan"), "federated_accuracy": None,
           "federated": {"mae": 0.3}, "epsilon": {"site a": 1.5}, "epsilon_max": 1.5, "clients_ok": 4,
           "secure_aggregation": {"updates_scaled": 2}}  # fmt: skip
    expected = {"r2": 0.7, "federated_mae": 0.3, "epsilon/site a": 1.5, "epsilon_max": 1.5, "clients_ok": 4.0,
                "secure_aggregation/updates_scaled": 2.0, "round": 2.0}  # fmt: skip
    assert round_metrics(row) == expected


def test_a_tracker_that_is_not_installed_is_said_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FedtrainError, match=r"needs the mlflow-skinny package; install it with pip install"):
        make_trackers(["mlflow"])
    code, _, err = run_cli(["report", str(tmp_path / "nowhere"), "--track", "mlflow"], capsys)
    _assert_user_error(code, err, "install it with pip install 'fedtrain[track]'")
    with pytest.raises(FedtrainError, match="track must name mlflow or tensorboard, not 'wandb'"):
        Config(track=["wandb"]).validate()


class Broken(Tracker):
    name = "broken"

    def open(self, run):
        pass

    def log_round(self, row):
        raise ConnectionError("tracking server unreachable")

    def attach(self, report, files):
        raise AssertionError("a dropped tracker is not called again")

    def close(self, finished):
        raise AssertionError("a dropped tracker is not called again")


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path, caplog):
    observer = Tracking.__new__(Tracking)
    observer.federation = SimpleNamespace(rows=[{"round": 1}], run_dir=tmp_path / "run")
    observer.trackers = [Broken()]
    with caplog.at_level(logging.WARNING, logger="fedtrain"):
        observer.after_round(record=None)  # type: ignore[arg-type]
        observer.after_run(completed=True)
    assert observer.trackers == []
    assert "tracking to broken stopped (ConnectionError: tracking server unreachable); the run goes on" in caplog.text
    assert f"fedtrain report {tmp_path / 'run'} --track broken" in caplog.text


def test_a_killed_and_resumed_run_continues_its_own_records(tmp_path, empty_mlflow_store, task_identity) -> None:  # noqa: F811
    """The server dies after round 2 (its MLflow run marked FAILED); the resumed run finds the same
    MLflow run and the same event files, and ends with every round in each exactly once."""
    from fedtrain.security.keys import generate_key, write_key_file
    from fedtrain.server.loop import Federation
    from tests.test_strategies import ControlledGrid

    key = write_key_file(tmp_path / "model.key", generate_key())
    mlflow_store(empty_mlflow_store, tmp_path / "mlruns")
    config = Config(clients=7, rounds=4, input_shape=[4], num_classes=3, fraction_evaluate=0.0,
                    run_dir=str(tmp_path / "run"), key_file=str(key), track=["mlflow", "tensorboard"],
                    mlflow_uri=str(tmp_path / "mlruns")).validate()  # fmt: skip

    def killed_after_round_2(row):
        if row["round"] == 2:
            raise KeyboardInterrupt  # after the tracking observer, like a Ctrl-C between two rounds

    with pytest.raises(KeyboardInterrupt):
        Federation(config, on_round=killed_after_round_2).run(ControlledGrid())
    run_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    client, runs = _mlflow_runs(tmp_path / "mlruns", run_id)
    assert [r.info.status for r in runs] == ["FAILED"]

    rows = Federation(config, on_round=lambda row: None, resume=True).run(ControlledGrid())
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    client, runs = _mlflow_runs(tmp_path / "mlruns", run_id)
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "epsilon_max"))
    assert steps == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(e.step for e in events.Scalars("round")) == [1, 2, 3, 4]


def test_a_servers_default_mlflow_store_is_where_fedtrain_server_runs(tmp_path, monkeypatch) -> None:
    """The ServerApp runs in another process, with another working directory: `fedtrain server`
    hands it MLflow's store as an absolute path (./mlruns where the server was started)."""
    from fedtrain.security.kits import provision
    from fedtrain.server.deployment import ServerOptions, deployment_config

    provision(tmp_path / "kits", ["127.0.0.1"], 1)
    monkeypatch.chdir(tmp_path)
    declared = Config(rounds=1, input_shape=[4], num_classes=3, track=["mlflow"])
    config = deployment_config(ServerOptions(tmp_path / "kits" / "server", declared, min_clients=1), tmp_path / "run")
    assert config.deployment.mlflow_uri == str(tmp_path / "mlruns")
    assert Config.from_run_config(config.to_run_config()).deployment.track == ["mlflow"]
    untracked = deployment_config(ServerOptions(tmp_path / "kits" / "server", declared.replace(track=[]),
                                                min_clients=1), tmp_path / "run")  # fmt: skip
    assert untracked.deployment.mlflow_uri is None
