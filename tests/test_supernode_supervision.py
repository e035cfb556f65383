"""How `fedtrain client` names a SuperNode's exit: Flower's own shutdown on a refused heartbeat.

A SuperNode whose key is unregistered while connected SIGINTs itself, once from its heartbeat and once
from its retries; on a busy machine the second signal kills it (-SIGINT) instead of a graceful 0 (CI saw
this). Both must read as the server no longer accepting the client, and only once it had connected.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from fedtrain.clients.deployment import _supervise
from fedtrain.errors import FedtrainError


class _Exited:
    """A process that has already exited with `code` after writing `log`."""

    def __init__(self, code: int | None, log: str) -> None:
        self.returncode, self._log, self.log_path = code, log, Path("/nonexistent/supernode.log")
        self.alive = code is None

    def log_tail(self, lines: int) -> str:
        return self._log


def _stop_reason(node_code: int, node_log: str, tmp_path: Path) -> str:
    with pytest.raises(FedtrainError) as stopped:
        _supervise(_Exited(node_code, node_log), _Exited(None, ""), lambda line: None, "client-1", "127.0.0.1:1",
                   stop_after=30, session=tmp_path / "session")  # fmt: skip
    return str(stopped.value)


@pytest.mark.parametrize("code", [0, -signal.SIGINT])
def test_a_connected_supernode_shut_down_by_flower_means_the_server_dropped_the_client(code, tmp_path) -> None:
    reason = _stop_reason(code, "INFO: SuperNode ID: 42\n", tmp_path)
    assert "the server no longer accepts this client" in reason


@pytest.mark.parametrize(
    ("code", "log"),
    [(-signal.SIGINT, "INFO: Starting Flower SuperNode\n"), (0, "INFO: Starting Flower SuperNode\n"),
     (-signal.SIGKILL, "INFO: SuperNode ID: 42\n"), (1, "INFO: SuperNode ID: 42\n")],
)  # fmt: skip
def test_other_exits_are_not_blamed_on_the_server(code, log, tmp_path) -> None:
    assert "no longer accepts" not in _stop_reason(code, log, tmp_path)
