"""The federation's public port: serves Flower's Fleet API and nothing else.

Flower's SuperLink serves the Fleet API (what SuperNodes use), the Control API (submit runs,
register node keys) and the runtime API on one port, and the open-source Control API asks for no
credentials. fedtrain therefore runs the SuperLink on a loopback port only it can reach, and puts
this gateway on the public port: TLS with the federation's certificate, and a forward to the
SuperLink only for `POST /v1/fleet/...`. Everything else is answered 403 and never reaches Flower.
SuperNode authentication (signed Fleet requests) passes through untouched.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedtrain.errors import FedtrainError

FLEET_PREFIX = "/v1/fleet/"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
log = logging.getLogger("fedtrain")


def _app(upstream: str, ca_file: Path | None) -> Starlette:
    verify: ssl.SSLContext | bool = False  # --insecure: plain HTTP to a plain SuperLink on loopback
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
        verify.check_hostname = False  # the upstream is our own child on loopback; the CA still must match
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(120.0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            log.warning("gateway refused %s %s from %s", request.method, path, request.client)
            return JSONResponse({"detail": "fedtrain serves only the Fleet API on this port"}, status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        reply = await client.post(path, content=await request.body(), headers=headers)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
        return Response(reply.content, status_code=reply.status_code, headers=out_headers)

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])


class FleetGateway:
    """Runs the gateway in a background thread of the fedtrain server process."""

    def __init__(self, host: str, port: int, upstream_port: int, tls: tuple[Path, Path, Path] | None) -> None:
        """`tls` is (certificate, key, CA); None only for an explicit --insecure server."""
        cert, key, ca = tls if tls is not None else (None, None, None)
        scheme = "https" if tls is not None else "http"
        config = uvicorn.Config(
            _app(f"{scheme}://127.0.0.1:{upstream_port}", ca),
            host=host,
            port=port,
            ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # we own the signals
        self.thread = threading.Thread(target=self.server.run, name="fleet-gateway", daemon=True)

    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FedtrainError("the Fleet gateway did not start; is the port free and the kit's key readable?")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
