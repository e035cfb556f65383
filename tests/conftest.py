"""Shared fixtures: every test gets its own fedtrain home (key store) and no key in the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedtrain.cli import main


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("fedtrain-home")
    monkeypatch.setenv("FEDTRAIN_HOME", str(home))
    monkeypatch.delenv("FEDTRAIN_MODEL_KEY", raising=False)
    return home


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the `fedtrain` entry point in-process: (exit code, stdout, stderr)."""
    old_argv = sys.argv
    sys.argv = ["fedtrain", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err


def run_cli_process(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None, cwd=None):
    """Run the installed `fedtrain` console script in a child process, bounded by `timeout`."""
    exe = Path(sys.executable).with_name("fedtrain")
    return subprocess.run(
        [str(exe), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new MLflow store folder (mlflow.db with MLflow's schema, no runs), made through fedtrain's own
    store_uri once per session: MLflow builds a SQLite store's schema in some 40 migrations, seconds
    each time, so tests that need an empty store copy this one (`mlflow_store`)."""
    from fedtrain.server.tracking import mlflow_store

    folder = tmp_path_factory.mktemp("mlflow-template") / "mlruns"
    uri, _ = mlflow_store.store_uri(str(folder))
    mlflow_store._client(uri).search_experiments()  # creates the schema (and MLflow's Default experiment)
    return folder


def mlflow_store(template: Path, folder: Path) -> Path:
    """An empty MLflow store at `folder`, copied from the session's `empty_mlflow_store`."""
    shutil.copytree(template, folder)
    return folder


@pytest.fixture(scope="session")
def tracked_demo_run(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_store: Path) -> dict[str, Path]:
    """The demo's federation (5 digits clients, DP-SGD at epsilon 3, private metrics), 3 rounds instead
    of 30, run by fedtrain's server loop and ClientApp in process, tracked live to MLflow and
    TensorBoard. Shared by the report and tracking tests; copy it before changing it."""
    from fedtrain.config import Config
    from fedtrain.security.keys import generate_key, write_key_file
    from tests.inprocess import run_federation

    tmp = tmp_path_factory.mktemp("demo-run")
    mlflow_store(empty_mlflow_store, tmp / "mlruns")
    key = write_key_file(tmp / "model.key", generate_key())
    config = Config(rounds=3, run_dir=str(tmp / "run"), key_file=str(key), track=["mlflow", "tensorboard"],
                    mlflow_uri=str(tmp / "mlruns"))  # fmt: skip
    run_federation(config)
    return {"run_dir": tmp / "run", "key": key, "mlruns": tmp / "mlruns"}
