"""The SuperLink for the fedtrain server alone: its user's processes only, its Control API by token.

Flower 1.42's SuperLink serves its Control API (submit and list runs, register node keys), the Fleet
API and the runtime API on one loopback port, and the open-source build asks for no credentials on
the Control API: any local process could list runs or register a key, and any local user could send
it whole bodies that the gateway's limits never see. Flower's CLI, however, already sends a bearer
token when its credential store holds one for the connection (the OIDC account plugin's entries in
$FLWR_HOME/credentials.yaml). So `fedtrain server`:

- starts the SuperLink through this module (`python -m fedtrain.server.control_guard <flower-superlink
  arguments>`), which puts one middleware in front of Flower's own, through Flower's extension hook
  for SuperLink middleware. On Linux it answers only connections whose client socket belongs to the
  user running the SuperLink (Linux's socket table: the gateway, `flwr`, the SuperExec and the
  ServerApp all do), before Flower reads a body; and every request but the Fleet API (SuperNodes,
  signed), the runtime API (Flower's own executor and ServerApp) and /health needs
  `Authorization: Bearer <token>`;
- writes that token where only its own `flwr` calls look: the credential store of its private
  FLWR_HOME (0700 folder, 0600 file), and a 0600 file in its private temporary folder for the
  SuperLink, whose path (never the token) travels in the environment.

The hook replaces one name inside flwr (`flwr.superlink.extensions.get_middleware`, pinned with
flwr in pyproject.toml); tests/test_control_api_local.py fails if an upgrade moves it.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from fedtrain.fileio import atomic_write_text

TOKEN_FILE_ENV = "FEDTRAIN_CONTROL_TOKEN_FILE"
OPEN_PREFIXES = ("/v1/fleet/", "/v1/runtime/")  # Fleet: signed by SuperNodes; runtime: Flower's own processes
OPEN_PATHS = frozenset({"/health"})
TCP_TABLE = Path("/proc/net/tcp")
NO_TOKEN = "the Control API answers only the fedtrain server that started it"
OTHER_USER = "this SuperLink answers only processes of the user that runs fedtrain server"


def peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The user owning the client end of a TCP connection over IPv4, from Linux's socket table; None if
    the connection is not there (gone, or not IPv4)."""
    try:
        ends = [f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}" for host, port in (client, server)]
    except OSError:
        return None
    wanted = " ".join(ends)  # the client's socket: local address, then remote; the server's is the other way
    with contextlib.suppress(OSError), TCP_TABLE.open() as table:
        for line in table:
            if wanted in line:
                return int(line.split()[7])
    return None


class SuperLinkGuard:
    """ASGI middleware in front of Flower's: (on Linux) only this user's processes are answered at all, and
    everything but the open paths also needs the bearer token (compared in constant time)."""

    def __init__(self, app: Any, token: str, uid: int | None) -> None:
        self.app, self.uid = app, uid
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            client, server = scope.get("client"), scope.get("server")
            if self.uid is not None and not (client and server and peer_uid(client, server) == self.uid):
                await _refuse(send, 403, OTHER_USER)  # before Flower reads a byte of the body
                return
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not scope["path"].startswith(OPEN_PREFIXES) and not hmac.compare_digest(given, self.expected):
                await _refuse(send, 401, NO_TOKEN)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def new_token() -> str:
    """A fresh Control API token (the server hands it to the SuperLink in memory: key_handover)."""
    return secrets.token_urlsafe(32)


def write_cli_credentials(flwr_home: Path, address: str, token: str) -> None:
    """Flower's CLI credential store, holding `token` for the connection to `address`.

    The entries are those `flwr login` leaves for an OIDC account (flwr.cli.constant's keys, values
    base64), so every `flwr` call with this FLWR_HOME sends `Authorization: Bearer <token>`.
    """
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY

    def encoded(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    entries = {
        AUTHN_TYPE_STORE_KEY % address: encoded("oidc"),
        ACCESS_TOKEN_STORE_KEY % address: encoded(token),
        REFRESH_TOKEN_STORE_KEY % address: encoded(token),  # never used: the guard's 401 asks for no refresh
    }
    atomic_write_text(flwr_home / "credentials.yaml", json.dumps(entries) + "\n", mode=0o600)  # JSON is YAML


def main() -> None:
    """`flower-superlink`, with the Control API closed to all but the holder of the token."""
    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    token = Path(os.environ.pop(TOKEN_FILE_ENV)).read_text().strip()
    uid = os.geteuid() if TCP_TABLE.exists() else None  # elsewhere than Linux: the token alone
    extensions.get_middleware = lambda: (Middleware(SuperLinkGuard, token=token, uid=uid),)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    from fedtrain import _flower

    # ServerApp runs in children of a warm worker (server/warm_serverapp.py), not a new process each
    _flower.set_serverapp_superexec([sys.executable, "-m", "fedtrain.server.warm_serverapp"])

    sys.argv = ["flower-superlink", *sys.argv[1:]]
    flower_superlink()


if __name__ == "__main__":
    main()
