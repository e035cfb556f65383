"""The SuperLink's Control API answers the `fedtrain server` that started it, and no other local
process: not one that holds the federation's CA certificate and a `flwr` configuration for the
loopback address, nor one that guesses a token. Fleet and runtime paths stay Flower's to check."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedtrain.config import Config
from fedtrain.processes import flower_env, free_port
from fedtrain.security import pki
from fedtrain.security.kits import provision
from fedtrain.server.control_guard import TCP_TABLE, SuperLinkGuard, peer_uid
from fedtrain.server.deployment import CONNECTION, Server, ServerOptions, _flwr_json

pytestmark = pytest.mark.e2e
FLWR = str(Path(sys.executable).with_name("flwr"))
LABELS = [str(i) for i in range(10)]


def _outsider_flwr(home: Path, *args: str) -> dict:
    """A `flwr` command of another local process: its own FLWR_HOME, the server's address, the CA."""
    result = subprocess.run([FLWR, *args, "--format", "json"], env=flower_env(home), capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    out = result.stdout
    return json.loads(out[out.index("{") :]) if "{" in out else {"success": False, "raw": out + result.stderr}


# Measured 10-13 s here (a SuperLink start, key registration, six `flwr` calls); a busy machine may take 5x.
@pytest.mark.timeout(240)
def test_only_the_server_reaches_its_control_api(tmp_path: Path) -> None:
    provision(tmp_path / "kits", ["127.0.0.1"], 1)
    config = Config(input_shape=[1, 8, 8], labels=LABELS)
    options = ServerOptions(tmp_path / "kits" / "server", config, host="127.0.0.1", port=free_port(), min_clients=1)
    ca = tmp_path / "kits" / "client-1" / "ca.crt"
    with Server(options, tmp_path / "run", say=lambda line: None) as server:
        server.start()
        address = f"127.0.0.1:{server.internal_port}"

        # The server itself: its `flwr` calls carry the token from its private FLWR_HOME.
        assert _flwr_json(["ls", CONNECTION], server.env)["runs"] == []
        assert len(_flwr_json(["supernode", "list", CONNECTION], server.env)["nodes"]) == 1

        # Another local process with the CA certificate and a connection to the same address.
        home = tmp_path / "outsider"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address}"\nroot-certificates = "{ca}"\n'
        )
        listed = _outsider_flwr(home, "ls", CONNECTION)
        assert not listed.get("success") and "runs" not in listed, listed
        stranger = pki.new_key()
        (tmp_path / "stranger.pub").write_bytes(pki.public_openssh(stranger) + b"\n")
        registered = _outsider_flwr(home, "supernode", "register", str(tmp_path / "stranger.pub"), CONNECTION)
        assert not registered.get("success"), registered
        assert len(_flwr_json(["supernode", "list", CONNECTION], server.env)["nodes"]) == 1  # no key was added

        # The same over plain HTTPS: the guard answers (its own words), Flower's handlers are never reached.
        trust = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(base_url=f"https://{address}", verify=trust, timeout=30) as client:
            for path, headers in [
                ("/v1/control/list-runs", {}),
                ("/v1/control/list-runs", {"authorization": "Bearer " + "A" * 43}),  # a guessed token
                ("/v1/control/start-run", {}),
                ("/v1/control/register-node", {}),
            ]:
                reply = client.post(path, content=b"", headers={"content-type": "application/protobuf", **headers})
                assert reply.status_code == 401 and "fedtrain server" in reply.text, (path, reply.text)
            assert client.get("/openapi.json").status_code == 401
            assert client.get("/health").status_code == 200
            # Fleet requests are Flower's to judge: an unsigned one meets Flower's own node authentication.
            fleet = client.post("/v1/fleet/get-run", content=b"", headers={"content-type": "application/protobuf"})
            assert fleet.status_code == 401 and "fedtrain server" not in fleet.text, fleet.text
        assert stat.S_IMODE(server.flwr_home.stat().st_mode) == 0o700
        assert stat.S_IMODE((server.flwr_home / "credentials.yaml").stat().st_mode) == 0o600
        assert server.token is not None and "/proc/self/fd/" in str(server.token.path)  # in memory, never on disk
    assert server.token is None  # released with the server


def test_the_guard_answers_only_its_users_processes_and_the_token_holder() -> None:
    """The middleware alone, on a real loopback connection: Linux's socket table names the user that
    owns the client end; a SuperLink run by another user refuses it before Flower sees the request."""
    if not TCP_TABLE.exists():
        pytest.skip("the socket table is Linux's")
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.create_connection(listener.getsockname()) as sock:
        client, server = sock.getsockname(), listener.getsockname()
        assert peer_uid(client, server) == os.geteuid()
        assert peer_uid(client, ("127.0.0.1", 1)) is None  # no such connection
        reached: list[str] = []

        async def flower(scope: dict, receive: object, send: object) -> None:
            reached.append(scope["path"])

        def status(guard: SuperLinkGuard, path: str, token: str | None = None) -> int | None:
            sent: list[dict] = []

            async def send(message: dict) -> None:
                sent.append(message)

            headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
            scope = {"type": "http", "path": path, "headers": headers, "client": client, "server": server}
            asyncio.run(guard(scope, None, send))
            return sent[0]["status"] if sent else None

        mine, someone_elses = SuperLinkGuard(flower, "t0ken", os.geteuid()), SuperLinkGuard(flower, "t0ken", 12345)
        assert status(someone_elses, "/v1/fleet/push-object") == 403
        assert status(someone_elses, "/v1/control/list-runs", "t0ken") == 403
        assert reached == []
        assert status(mine, "/v1/fleet/push-object") is None  # passed on to Flower
        assert status(mine, "/v1/runtime/acquire-task") is None
        assert status(mine, "/v1/control/list-runs") == 401
        assert status(mine, "/v1/control/list-runs", "guess") == 401
        assert status(mine, "/v1/control/list-runs", "t0ken") is None
        assert status(mine, "/openapi.json") == 401
        assert reached == ["/v1/fleet/push-object", "/v1/runtime/acquire-task", "/v1/control/list-runs"]


def _can_run_as_nobody() -> bool:
    try:
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"],
                               capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


OTHER_USER_CALLS = """
import sys, httpx
with httpx.Client(base_url=sys.argv[1], verify=False, timeout=30) as client:
    for path in ["/v1/fleet/pull-messages", "/v1/control/list-runs", "/v1/runtime/acquire-task"]:
        reply = client.post(path, content=bytes(100_000), headers={"content-type": "application/protobuf"})
        print(path, reply.status_code)
"""


# Measured 4 s here; it needs root outside a user namespace (`make test` runs in one: it skips there).
@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or not TCP_TABLE.exists(), reason="needs root to act as another user, on Linux")
def test_another_users_process_gets_nothing_from_the_superlink(tmp_path: Path) -> None:
    if not _can_run_as_nobody():
        pytest.skip("cannot switch to another user here (a user namespace maps only one)")
    provision(tmp_path / "kits", ["127.0.0.1"], 1)
    config = Config(input_shape=[1, 8, 8], labels=LABELS)
    options = ServerOptions(tmp_path / "kits" / "server", config, host="127.0.0.1", port=free_port(), min_clients=1)
    with Server(options, tmp_path / "run", say=lambda line: None) as server:
        server.start()
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        calls = [sys.executable, "-c", OTHER_USER_CALLS, f"https://127.0.0.1:{server.internal_port}"]
        result = subprocess.run([*nobody, *calls], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.stdout.split() == [
        "/v1/fleet/pull-messages", "403", "/v1/control/list-runs", "403", "/v1/runtime/acquire-task", "403",
    ], result.stdout + result.stderr  # fmt: skip
