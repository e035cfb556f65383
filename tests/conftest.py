"""Shared fixtures: every test gets its own fedtrain home (key store) and no key in the environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtrain.cli import main

# `@pytest.mark.own_process`: the test runs in a pytest of its own, a fresh Python process. For tests that
# start Ray in-process (fedtrain.simulate, fedtrain.tune): measured beside two CPU hogs, a pytest worker's
# third Ray session hung with its actors waiting for their task arguments, and the worker later crashed in
# Ray's _raylet.so. One process per such test keeps every pytest worker free of Ray.
OWN_PROCESS = "FEDTRAIN_TEST_IN_OWN_PROCESS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_process: run this test in a fresh Python process (it starts Ray)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(OWN_PROCESS):
        return None
    marked = pyfuncitem.get_closest_marker("timeout")
    limit = float(marked.args[0]) if marked and marked.args else float(pyfuncitem.config.getini("timeout") or 600)
    basetemp = pyfuncitem.config._tmp_path_factory.mktemp("own-process")  # type: ignore[attr-defined]
    argv = [sys.executable, "-m", "pytest", pyfuncitem.nodeid, "-q", "-rfE", "-p", "no:cacheprovider",
            "--basetemp", str(basetemp)]  # fmt: skip
    env = {**os.environ, OWN_PROCESS: "1"}
    child = subprocess.Popen(argv, cwd=pyfuncitem.config.rootpath, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    late = False
    try:
        output, _ = child.communicate(timeout=limit - 20)  # before this pytest's own timeout, to say why
    except subprocess.TimeoutExpired:
        late = True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the child pytest and whatever it started (Ray)
    if late:
        output, _ = child.communicate(timeout=30)
    if late or child.returncode != 0:
        why = f"ran past {limit - 20:.0f} s" if late else f"exited with {child.returncode}"
        pytest.fail(f"the test in its own process {why}:\n{output[-8000:]}", pytrace=False)
    return True


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
