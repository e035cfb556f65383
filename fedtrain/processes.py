"""Supervised child processes (SuperLink, SuperNode, flwr CLI): each in its own process group so
that stopping it also stops everything it spawned, every wait bounded by a timeout."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from fedtrain.errors import FedtrainError


def tool(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink...), found beside Python."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


# Secrets a Flower process never needs: the model key ($FEDTRAIN_MODEL_KEY; the server's run names its key file).
SECRET_ENV = ("FEDTRAIN_MODEL_KEY",)


SUPEREXEC_POLL = 0.05  # seconds between a SuperExec's asks for a task (local, about 1 ms each: benchmarks/RESULTS.md)


def flower_env(flwr_home: Path | None = None, hide: Iterable[str | None] = ()) -> dict[str, str]:
    """Environment for Flower's processes: our tools first on PATH, quiet, no runtime installs.

    Args:
        flwr_home: Flower's home folder for these processes (FLWR_HOME), if any.
        hide: names of further variables that hold secrets (e.g. the one --passphrase-env names);
            they and SECRET_ENV are left out, so no child (nor what it runs) can read them.

    Returns:
        A copy of this process's environment with those changes.
    """
    secrets = {*SECRET_ENV, *(name for name in hide if name)}
    env = {name: value for name, value in os.environ.items() if name not in secrets}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superexec_env(env: dict[str, str]) -> dict[str, str]:
    """A SuperExec's environment (a client's, the server's): it asks its SuperNode or SuperLink for a task
    every SUPEREXEC_POLL seconds (Flower's default is 1 s, a second of waiting per message), and its warm
    worker, which tasks are forked from, keeps numpy's BLAS to one thread (no pool of idle threads in a
    process that forks; each task trains on one thread anyway, clients/handlers.py)."""
    return {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL), "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for a child to bind a moment later.

    Chosen below Linux's ephemeral range (32768+) so that outgoing connections, which take their
    source ports from that range, cannot grab it in between."""
    for _ in range(50):
        port = random.randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise FedtrainError(
                f"port {port} on {host} is in use; stop what uses it or choose another --port."
            ) from None


def wait_for_port(host: str, port: int, timeout: float, process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive:
            raise FedtrainError(
                f"{process.name} exited with code {process.returncode} while starting; see {process.log_path}."
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise FedtrainError(f"nothing listens on {host}:{port} after {timeout:.0f} s.")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Send this process `sig` when its parent dies, even by SIGKILL, so none is orphaned (Linux; elsewhere
    nothing). Called in a child before exec, or in a forked child."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG


class ManagedProcess:
    """A child in its own session; `stop()` terminates the whole group, then kills it if needed."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, pass_fds: tuple[int, ...] = ()
    ) -> None:
        """Start `argv`; `pass_fds` are descriptors it inherits under the same numbers (e.g. an in-memory key)."""
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=pass_fds,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads touched
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout`; idempotent."""
        pgid = self.process.pid
        descendants = _descendants(pgid)  # some Flower children start their own session
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # children that outlived their parent, too
        for child in descendants:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines, reading at most the last 64 KiB (supervisors call this twice a second)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 65536))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux); empty elsewhere."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def run_tool(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short Flower CLI command, bounded by `timeout`."""
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        command = " ".join([Path(argv[0]).name, *argv[1:]])
        raise FedtrainError(f"`{command}` did not finish in {timeout:.0f} s.") from None
