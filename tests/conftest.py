"""Shared fixtures: every test gets its own fedtrain home (key store) and no key in the environment."""

from __future__ import annotations

import os
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
