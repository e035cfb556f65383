"""Clear, fast failures of a real federation: each a one-sentence error within a bounded time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedtrain.processes import free_port
from fedtrain.security import pki
from fedtrain.security.kits import provision
from tests.test_deployment_e2e import Processes, _wait_for

pytestmark = pytest.mark.e2e
FEDTRAIN = str(Path(sys.executable).with_name("fedtrain"))


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    provision(tmp / "kits", ["127.0.0.1"], 3)  # client-3 is for the unregistration test
    provision(tmp / "other", ["127.0.0.1"], 1)  # another federation: another CA
    np.savez(tmp / "shard.npz", x=np.zeros((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    # 20 samples: batches of 5 keep the sample rate within a default client policy (at most 0.5)
    (tmp / "fed.toml").write_text("rounds = 1\ninput_shape = [1, 8, 8]\nnum_classes = 10\nbatch_size = 5\n")
    env = {**os.environ, "FEDTRAIN_HOME": str(tmp / "home"), "COLUMNS": "200"}
    procs = Processes(env, tmp)
    port = free_port()
    server = procs.start(
        "server", "server", "--kit", str(tmp / "kits" / "server"), "--config", str(tmp / "fed.toml"),
        "--min-clients", "2", "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp / "run"),
        "--wait-timeout", "600",
    )  # fmt: skip
    try:
        _wait_for(lambda: "Fleet API" in procs.output("server") or server.poll() is not None, 240, "the server")
        assert server.poll() is None, procs.output("server")
        yield tmp, port, env
    finally:
        procs.stop_all()


def _client(env: dict, kit: Path, server: str, data: Path, timeout: float = 90, *extra: str):
    started = time.monotonic()
    result = subprocess.run(
        [FEDTRAIN, "client", "--kit", str(kit), "--server", server, "--data", str(data), *extra],
        env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True,
    )  # fmt: skip
    return result, time.monotonic() - started


def _one_sentence(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr


def test_client_with_another_federations_ca(running_server) -> None:
    tmp, port, env = running_server
    result, seconds = _client(env, tmp / "other" / "client-1", f"127.0.0.1:{port}", tmp / "shard.npz")
    _one_sentence(result, "not signed by this kit's CA")
    assert seconds < 60


def test_client_whose_key_is_not_registered(running_server, tmp_path) -> None:
    tmp, port, env = running_server
    kit = tmp_path / "client-x"
    shutil.copytree(tmp / "kits" / "client-1", kit)
    unknown = pki.new_key()  # a key pair the server never registered (the kit itself is consistent)
    (kit / "node.key").write_bytes(pki.private_openssh(unknown))
    (kit / "node.pub").write_bytes(pki.public_openssh(unknown) + b"\n")
    os.chmod(kit / "node.key", 0o600)
    result, seconds = _client(env, kit, f"127.0.0.1:{port}", tmp / "shard.npz")
    _one_sentence(result, "does not accept this client's key")
    assert seconds < 60


def test_server_unreachable(running_server) -> None:
    tmp, _, env = running_server
    result, seconds = _client(env, tmp / "kits" / "client-1", f"127.0.0.1:{free_port()}", tmp / "shard.npz", 90,
                              "--max-wait", "5")  # fmt: skip
    _one_sentence(result, "cannot be reached")
    assert seconds < 60


def test_bad_shard_fails_before_connecting(running_server) -> None:
    tmp, port, env = running_server
    (tmp / "bad.csv").write_text("a,label\nx,1\n")
    result, seconds = _client(env, tmp / "kits" / "client-1", f"127.0.0.1:{port}", tmp / "bad.csv")
    _one_sentence(result, "'x' is not a number")
    assert seconds < 30


def _server(env: dict, kit: Path, config: Path, port: int, run_dir: Path) -> subprocess.CompletedProcess:
    """A `fedtrain server` expected to fail fast (bounded by the timeout)."""
    return subprocess.run(
        [FEDTRAIN, "server", "--kit", str(kit), "--config", str(config), "--host", "127.0.0.1",
         "--port", str(port), "--run-dir", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=180, start_new_session=True,
    )  # fmt: skip


def test_server_port_in_use(running_server) -> None:
    tmp, _, env = running_server
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _server(env, tmp / "kits" / "server", tmp / "fed.toml", port, tmp / "run-busy")
    _one_sentence(result, f"port {port} on 127.0.0.1 is in use")


def test_server_without_model_description(running_server) -> None:
    tmp, _, env = running_server
    (tmp / "empty.toml").write_text("rounds = 1\n")
    result = _server(env, tmp / "kits" / "server", tmp / "empty.toml", free_port(), tmp / "run-empty")
    _one_sentence(result, "must give input_shape and num_classes")


def test_client_kit_given_to_server(running_server) -> None:
    tmp, _, env = running_server
    result = _server(env, tmp / "kits" / "client-1", tmp / "fed.toml", free_port(), tmp / "run-kit")
    _one_sentence(result, "is a client kit, not a server kit")


def test_client_without_tls_against_a_tls_server(running_server) -> None:
    tmp, port, env = running_server
    result, seconds = _client(env, tmp / "kits" / "client-1", f"127.0.0.1:{port}", tmp / "shard.npz", 90,
                              "--insecure", "--max-wait", "5")  # fmt: skip
    _one_sentence(result, "without TLS; the server probably requires TLS: drop --insecure")
    assert "WARNING: --insecure client" in result.stderr
    assert seconds < 60


def test_insecure_server_must_be_asked_for_warns_and_still_locks_the_control_plane(tmp_path) -> None:
    import signal
    import urllib.error
    import urllib.request

    provision(tmp_path / "kits", ["127.0.0.1"], 2)  # the server waits for two
    (tmp_path / "fed.toml").write_text("rounds = 1\ninput_shape = [4]\nnum_classes = 2\n")
    env = {**os.environ, "FEDTRAIN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    procs = Processes(env, tmp_path)
    port = free_port()
    try:
        server = procs.start("server", "server", "--kit", str(tmp_path / "kits" / "server"), "--config",
                             str(tmp_path / "fed.toml"), "--host", "127.0.0.1", "--port", str(port), "--run-dir",
                             str(tmp_path / "run"), "--insecure")  # fmt: skip
        _wait_for(lambda: "Fleet API" in procs.output("server") or server.poll() is not None, 240, "the server")
        assert "WARNING: --insecure server" in procs.output("server")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/control/start-run", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 143
    finally:
        procs.stop_all()


def test_a_client_whose_key_is_unregistered_while_connected_stops_and_says_so(running_server) -> None:
    import json

    tmp, port, env = running_server
    flwr = [str(Path(sys.executable).with_name("flwr")), "supernode"]
    flwr_env = {**env, "FLWR_HOME": str(tmp / "run" / ".flwr")}  # the server's own connection to its SuperLink
    client = subprocess.Popen(
        [FEDTRAIN, "client", "--kit", str(tmp / "kits" / "client-3"), "--server", f"127.0.0.1:{port}", "--data",
         str(tmp / "shard.npz")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip

    def online() -> list[dict]:
        listed = subprocess.run([*flwr, "list", "fedtrain", "--format", "json"], env=flwr_env, capture_output=True,
                                text=True, timeout=180)  # fmt: skip
        nodes = json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]
        return [node for node in nodes if node["status"] == "online"]

    try:
        _wait_for(lambda: len(online()) == 1, 300, "client-3 online")
        (node,) = online()
        subprocess.run([*flwr, "unregister", str(node["node-id"]), "fedtrain"], env=flwr_env, check=True,
                       capture_output=True, timeout=180)  # fmt: skip
        _, err = client.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
    assert client.returncode == 2 and "Traceback" not in err
    assert "the server no longer accepts this client" in " ".join(err.split())


def test_passphrase_protected_kits(tmp_path) -> None:
    """Flower reads no encrypted key: the server and the client decrypt theirs into a private folder
    that is gone when they stop; a missing or wrong passphrase is one sentence, before anything starts."""
    import signal
    import ssl

    provision(tmp_path / "kits", ["127.0.0.1"], 2, passphrase=b"correct horse")  # the server waits for both
    (tmp_path / "fed.toml").write_text("rounds = 1\ninput_shape = [1, 8, 8]\nnum_classes = 10\n")
    np.savez(tmp_path / "shard.npz", x=np.zeros((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    env = {**os.environ, "FEDTRAIN_HOME": str(tmp_path / "home"), "COLUMNS": "200", "KIT_PASS": "correct horse",
           "WRONG_PASS": "battery staple", "TMPDIR": str(tmp_path)}  # fmt: skip
    server_kit = tmp_path / "kits" / "server"
    result = _server(env, server_kit, tmp_path / "fed.toml", free_port(), tmp_path / "run-1")
    _one_sentence(result, "server.key is passphrase-protected; pass --passphrase-env VAR")
    result = subprocess.run(
        [FEDTRAIN, "server", "--kit", str(server_kit), "--config", str(tmp_path / "fed.toml"), "--port",
         str(free_port()), "--run-dir", str(tmp_path / "run-2"), "--passphrase-env", "WRONG_PASS"],
        env=env, capture_output=True, text=True, timeout=180, start_new_session=True,
    )  # fmt: skip
    _one_sentence(result, "the passphrase does not open")
    result, _ = _client(env, tmp_path / "kits" / "client-1", "127.0.0.1:9", tmp_path / "shard.npz", 60)
    _one_sentence(result, "node.key is passphrase-protected; pass --passphrase-env VAR")

    procs = Processes(env, tmp_path)
    port = free_port()
    try:
        server = procs.start("server", "server", "--kit", str(server_kit), "--config", str(tmp_path / "fed.toml"),
                             "--host", "127.0.0.1", "--port", str(port), "--run-dir", str(tmp_path / "run-3"),
                             "--passphrase-env", "KIT_PASS")  # fmt: skip
        _wait_for(lambda: "Fleet API" in procs.output("server") or server.poll() is not None, 240, "the server")
        assert server.poll() is None, procs.output("server")
        assert not list(tmp_path.glob("fedtrain-server-*"))  # the decrypted TLS key lives in memory only
        _assert_no_decrypted_key(tmp_path)
        context = ssl.create_default_context(cafile=str(server_kit / "ca.crt"))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        os.killpg(server.pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 143
    finally:
        procs.stop_all()


def _assert_no_decrypted_key(root: Path) -> None:
    """No file under `root` holds a private key in the clear (kits hold theirs encrypted)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert b"PRIVATE KEY-----" not in data or b"ENCRYPTED PRIVATE KEY" in data, path
    assert not [p for p in root.rglob("fedtrain-node-*")] + [p for p in root.rglob("fedtrain-server-*")]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _supernode_of(client_pid: int) -> int | None:
    from fedtrain.processes import _descendants

    return next((pid for pid in _descendants(client_pid) if "fedtrain.clients.supernode" in _cmdline(pid)), None)


def _secret_free_children(parent_pid: int, secret: bytes) -> None:
    """No process below `parent_pid` has the passphrase in its environment."""
    from fedtrain.processes import _descendants

    children = _descendants(parent_pid)
    assert children
    for pid in children:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a short-lived flwr call may be gone
            assert secret not in Path(f"/proc/{pid}/environ").read_bytes(), _cmdline(pid)


@pytest.mark.timeout(900)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sigkilled_passphrase_client_leaves_no_decrypted_key(tmp_path) -> None:
    """Issue 13.3: server and client decrypt their keys into memory files handed to Flower's processes
    (/proc/self/fd/N), never to disk; children never see the passphrase. A client killed with SIGKILL,
    and started again, leaves no decrypted key anywhere (TMPDIR, FEDTRAIN_HOME, the whole test folder)."""
    provision(tmp_path / "kits", ["127.0.0.1"], 2, passphrase=b"correct horse")  # the server waits for both
    (tmp_path / "fed.toml").write_text("rounds = 1\ninput_shape = [1, 8, 8]\nnum_classes = 10\n")
    np.savez(tmp_path / "shard.npz", x=np.zeros((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 10)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "FEDTRAIN_HOME": str(tmp_path / "home"), "COLUMNS": "200", "KIT_PASS": "correct horse",
           "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    procs = Processes(env, tmp_path)
    port = free_port()
    client_args = ["client", "--kit", str(tmp_path / "kits" / "client-1"), "--server", f"127.0.0.1:{port}",
                   "--data", str(tmp_path / "shard.npz"), "--passphrase-env", "KIT_PASS"]  # fmt: skip
    try:
        server = procs.start("server", "server", "--kit", str(tmp_path / "kits" / "server"), "--config",
                             str(tmp_path / "fed.toml"), "--host", "127.0.0.1", "--port", str(port), "--run-dir",
                             str(tmp_path / "run"), "--passphrase-env", "KIT_PASS", "--min-clients", "2")  # fmt: skip
        _wait_for(lambda: "Fleet API" in procs.output("server") or server.poll() is not None, 240, "the server")
        assert server.poll() is None, procs.output("server")
        client = procs.start("client-a", *client_args)
        _wait_for(lambda: "connected to" in procs.output("client-a") or client.poll() is not None, 300, "client")
        assert "connected to" in procs.output("client-a"), procs.output("client-a")  # Flower read the key from memory
        supernode = _supernode_of(client.pid)
        assert supernode is not None and "--auth-supernode-private-key /proc/self/fd/" in _cmdline(supernode)
        _secret_free_children(client.pid, b"correct horse")
        _secret_free_children(server.pid, b"correct horse")
        _assert_no_decrypted_key(tmp_path)

        os.kill(client.pid, signal.SIGKILL)  # the fedtrain client alone: its children die with it (PDEATHSIG)
        client.wait(timeout=10)
        _wait_for(lambda: not Path(f"/proc/{supernode}").exists(), 30, "the orphaned SuperNode to die")
        _assert_no_decrypted_key(tmp_path)

        again = procs.start("client-b", *client_args)
        restarted = ("connected to", "still holds this client's previous session")  # both: the key was read
        _wait_for(lambda: any(m in procs.output("client-b") for m in restarted) or again.poll() is not None, 300,
                  "the restarted client")  # fmt: skip
        assert again.poll() is None, procs.output("client-b")
        _assert_no_decrypted_key(tmp_path)
    finally:
        procs.stop_all()
    _assert_no_decrypted_key(tmp_path)


def test_wrong_payload_key_is_rejected_and_the_round_goes_on(running_server) -> None:
    """Runs last in this module: the waiting server gets its two clients, one of them with an uplink
    key the server does not have. Its reply is rejected with the reason; the run completes."""
    import json
    import signal

    tmp, port, env = running_server
    kit = tmp / "client-2-wrong-key"
    shutil.copytree(tmp / "kits" / "client-2", kit)
    from fedtrain.security.keys import encode_key, generate_key

    (kit / "uplink.key").write_text(encode_key(generate_key()) + "\n")
    os.chmod(kit / "uplink.key", 0o600)
    clients = [
        subprocess.Popen(
            [FEDTRAIN, "client", "--kit", str(k), "--server", f"127.0.0.1:{port}", "--data", str(tmp / "shard.npz")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        for k in (tmp / "kits" / "client-1", kit)
    ]
    try:
        _wait_for(lambda: (tmp / "run" / "model.ftenc").exists(), 600, "the run to finish")
    finally:
        for child in clients:
            os.killpg(child.pid, signal.SIGTERM)
        for child in clients:
            child.wait(timeout=30)
    (row,) = json.loads((tmp / "run" / "metrics.json").read_text())
    assert row["clients_ok"] == 1 and row["clients_failed"] == 1
    (reason,) = row["failed"].values()
    assert "reply rejected" in reason and "encrypted with a different key" in reason
    verified = subprocess.run([FEDTRAIN, "verify", str(tmp / "run"), "--key-file", str(tmp / "kits" / "server" /
                               "model.key")], env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr  # the deployed ServerApp recorded its files
    assert "privacy.json: ok" in verified.stdout and "model.ftenc: ok" in verified.stdout
