"""`fedtrain simulate` keeps Ray on loopback: every socket that Ray's processes (GCS, raylet, the
driver, workers, the runtime-env agent) listen on is bound to 127.0.0.0/8, never to a wildcard or to
the machine's own address.

The simulation runs in a private network namespace that has, besides loopback, an interface with a
routable-looking address (198.51.100.7, a documentation range, on a veth pair that leads nowhere), so
the test sees what a machine on a network would: `make test` itself runs in a namespace with only
loopback, where any bind would trivially stay local."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sockets import Listener, descendants, listeners, same_network_namespace

pytestmark = pytest.mark.e2e
FEDTRAIN = str(Path(sys.executable).with_name("fedtrain"))
EXTERNAL = "198.51.100.7"
NETWORK = (
    "ip link set lo up && ip link add ft0 type veth peer name ft1 && "
    f"ip addr add {EXTERNAL}/24 dev ft0 && ip link set ft0 up && ip link set ft1 up && "
    "ip route add default via 198.51.100.1 dev ft0"
)


def _private_network_available() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rn", "sh", "-c", NETWORK], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _host_has_external_address() -> bool:
    """The address the host would use to reach the internet (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return False
        return not probe.getsockname()[0].startswith("127.")


def _namespace(pid: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/net")
    return ""


def _kill_tree(pid: int, namespace: bool) -> None:
    tree = same_network_namespace(pid) if namespace else descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def _actor_niceness(pid: int) -> int | None:
    """The niceness of `pid` if it is a simulated client's Ray worker (ray::ClientAppActor), else None."""
    try:
        if b"ClientAppActor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    except (OSError, IndexError, ValueError):
        return None


# Measured 21-30 s on the shared 2-core machine (Ray's start-up dominates); a busy machine may take 5x.
@pytest.mark.timeout(360)
def test_simulate_binds_every_ray_socket_to_loopback(tmp_path: Path) -> None:
    namespace = _private_network_available()
    if not namespace and not _host_has_external_address():
        pytest.skip("no private network namespace and no external address: every bind would look local")
    args = [FEDTRAIN, "simulate", "--rounds", "2", "--clients", "2", "--model", "logistic",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    argv = ["unshare", "-rn", "sh", "-c", NETWORK + ' && exec "$@"', "sh", *args] if namespace else args
    log = tmp_path / "simulate.log"
    seen: dict[tuple[str, str, int], Listener] = {}
    actors: dict[int, int] = {}  # pid -> niceness of each simulated client's Ray worker
    with open(log, "wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while child.poll() is None:
            assert time.monotonic() < deadline, "the simulation did not finish in 300 s"
            # The child's namespace is read before its processes: it moves out of ours once, never back,
            # so a namespace read first cannot be ours while the processes listed after it are.
            moved = not namespace or _namespace(child.pid) not in ("", _namespace(os.getpid()))
            pids = same_network_namespace(child.pid) if namespace else descendants(child.pid)
            if namespace and child.pid in pids:
                pids.remove(child.pid)
                pids.insert(0, child.pid)  # listeners() reads the namespace of pids[0]: the child's
            actors.update({pid: nice for pid in pids if (nice := _actor_niceness(pid)) is not None})
            if pids and moved:
                for listener in listeners(pids, whole_namespace=namespace):
                    seen[(listener.proto, str(listener.address), listener.port)] = listener
            outside = [str(entry) for entry in seen.values() if not entry.loopback]
            assert not outside, f"listening outside loopback: {outside}"
            time.sleep(0.3)
    finally:
        _kill_tree(child.pid, namespace)
        child.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert child.returncode == 0, output
    assert (tmp_path / "run" / "model.ftenc").exists(), output
    owners = " ".join(entry.process for entry in seen.values())
    # The test saw Ray itself, not an empty table: its GCS and raylet both listen while it runs.
    assert "gcs_server" in owners and "raylet" in owners, f"Ray's servers never seen: {list(map(str, seen.values()))}"
    # Ray runs workers at nice 15; the simulated clients are the work, at the priority of the run itself
    assert actors and set(actors.values()) == {os.nice(0)}, f"client workers' niceness: {actors}"


def test_ray_local_mode_names_relied_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray internals `ray_local_only` sets: if an upgrade renames them, this fails first."""
    from ray._private import ray_constants, services

    from fedtrain.simulation import ray_local_only

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # restored after the test, as are the variables
    for name, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    # as in a process that imported Ray before fedtrain chose a token (an earlier simulation in this
    # process would have chosen one, and rightly keeps it)
    monkeypatch.setattr("fedtrain.simulation._RAY_TOKEN", None)
    ray_local_only()
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    # Ray is imported here, its authentication mode fixed: switching it now would lock the driver out.
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ


HOLDER = """
import sys, tempfile
from fedtrain.simulation import ray_local_only
ray_local_only()
import os, ray
from fedtrain.local_ray import start_ray
start_ray(dict(num_cpus=1, num_gpus=0, _temp_dir=tempfile.mkdtemp(prefix="ftray-"), _node_ip_address="127.0.0.1",
               include_dashboard=False, log_to_driver=False, logging_level="error"))  # retried on a busy machine
print(ray.get_runtime_context().gcs_address, os.environ["RAY_AUTH_TOKEN"], flush=True)
sys.stdin.read()
ray.shutdown()
"""
OUTSIDER = """
import sys
from ray._raylet import GcsClient
print("nodes", len(GcsClient(address=sys.argv[1]).get_all_node_info(timeout=60)))
"""


# Measured 10 s here (one Ray start); the timeout leaves a busy machine 10x.
@pytest.mark.timeout(600)
def test_ray_refuses_a_local_process_without_the_token(tmp_path: Path) -> None:
    """Another local user reaches loopback too: without the run's token, Ray's GCS tells it nothing
    (the node list here; its key-value store and task submission are behind the same check)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        line = holder.stdout.readline().split()  # bounded by the test's timeout
        assert len(line) == 2, "Ray did not start"
        gcs, token = line

        def outsider(extra: dict[str, str]) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", OUTSIDER, gcs], env={**env, **extra},
                                  capture_output=True, text=True, timeout=180)  # fmt: skip

        refused = outsider({})
        assert refused.returncode != 0 and "Authentication" in refused.stderr, refused.stdout + refused.stderr
        allowed = outsider({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})  # the same call, with the token
        assert allowed.stdout.strip() == "nodes 1", allowed.stderr
    finally:
        tree = descendants(holder.pid)
        with contextlib.suppress(OSError):
            holder.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            holder.wait(timeout=30)  # a clean ray.shutdown()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        holder.wait(timeout=10)
