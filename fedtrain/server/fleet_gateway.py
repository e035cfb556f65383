"""The federation's public port: serves Flower's Fleet API and nothing else, within bounds.

Flower's SuperLink serves the Fleet API (what SuperNodes use), the Control API (submit runs,
register node keys) and the runtime API on one port, and the open-source Control API asks for no
credentials. fedtrain therefore runs the SuperLink on a loopback port only it can reach, and puts
this gateway on the public port: TLS with the federation's certificate, and a forward to the
SuperLink only for `POST /v1/fleet/<endpoint>`. Everything else is answered 403 and never reaches
Flower. SuperNode authentication headers pass through untouched.

The port faces the network, so every resource a request can hold is bounded (fleet_limits.py):
connections (in all and per address), the time to finish a TLS handshake, a request head, a body
and a reply, the head's size, the body's size (from the run's model, counted while reading, 413
past it), the requests in flight (per node and in all) and per second (per node; 503 past either,
which Flower's SuperNode retries). With node authentication on, the signature headers are checked
before any body is read (fleet_auth.py), so an outsider never gets a body read at all, except on the
four node-lifecycle endpoints, which the SuperLink answers itself (their bodies are small).

One thread per connection, blocking sockets with deadlines, h11 for HTTP/1.1 (what Flower's
SuperNode speaks). A general-purpose ASGI server has no timeout on a request's head or body, which
is what a slow client exploits; and asyncio's TLS layer in CPython 3.11 keeps a 256 KiB buffer per
connection alive until a full garbage collection (measured: the server grew by 250 MB under a TLS
connection flood), which a blocking ssl socket does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h11
import httpx

from fedtrain.errors import FedtrainError
from fedtrain.server.fleet_auth import NodeKeys
from fedtrain.server.fleet_limits import GatewayLimits

FLEET_PATH = re.compile(r"/v1/fleet/[a-z0-9-]{1,64}")  # no query, no escapes, no dots: nothing to reinterpret
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
# Node lifecycle: checked by the SuperLink alone, which answers an unknown key in its own words (that
# `fedtrain client` explains); their bodies are small, so the gateway reads them under the small limit.
NODE_LIFECYCLE = frozenset(
    {"/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node", "/v1/fleet/unregister-node"}
)
READ_SIZE = 64 * 1024
LOG_EVERY = 10.0  # seconds between two log lines about the same kind of refusal
LINGER = 1.0  # after a refusal: seconds to discard what the client still sends, so it can read the answer
log = logging.getLogger("fedtrain")


class _Refusal(Exception):
    """Answer this request with `status` and close the connection."""

    def __init__(self, status: int, reason: str, json: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.json = status, reason, json

    def body(self) -> tuple[bytes, list[tuple[str, str]]]:
        """The reply's body and content type: FastAPI's `{"detail": ...}` where a SuperLink would answer."""
        if self.json:
            return json.dumps({"detail": self.reason}).encode(), [("content-type", "application/json")]
        return self.reason.encode(), [("content-type", "text/plain; charset=utf-8")]


class _RefusalLog:
    """At most one line per kind of refusal every LOG_EVERY seconds: a flood must not flood the log."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}
        self.count: Counter[str] = Counter()

    def __call__(self, reason: str, address: str) -> None:
        with self.lock:
            self.count[reason] += 1
            now = time.monotonic()
            if now - self.last.get(reason, -LOG_EVERY) < LOG_EVERY:
                return
            count, self.last[reason], self.count[reason] = self.count[reason], now, 0
        log.warning("gateway refused %s (%s; %d such since the last line)", address, reason, count)


class _Rates:
    """A token bucket per client: `rate` requests a second, `burst` at once. Not thread-safe: the caller locks."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[object, tuple[float, float]] = {}  # client -> (tokens, when)

    def take(self, client: object) -> bool:
        now = time.monotonic()
        tokens, when = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if len(self.buckets) > 4096:  # forget clients whose bucket has refilled: they cost nothing to recreate
            self.buckets = {c: b for c, b in self.buckets.items() if b[0] + (now - b[1]) * self.rate < self.burst}
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return False
        self.buckets[client] = (tokens - 1.0, now)
        return True


class _Connection:
    """One client connection: requests read with h11 from a socket with deadlines, one after another."""

    def __init__(self, gateway: _Gateway, sock: socket.socket, address: str) -> None:
        self.gateway, self.limits, self.sock, self.address = gateway, gateway.limits, sock, address
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)

    def serve(self) -> None:
        while True:
            try:
                request = self._next(time.monotonic() + self.limits.head_timeout, h11.Request)
            except h11.RemoteProtocolError as error:  # a malformed or oversized head
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    self._send(error.error_status_hint, b"", close=True)
                return
            if request is None:
                return  # closed between requests
            try:
                self._exchange(request)
            except _Refusal as refusal:
                self.gateway.refused(refusal.reason, self.address)
                body, headers = refusal.body()
                self._send(refusal.status, body, headers=headers, close=True)
                self._linger()
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    def _exchange(self, request: h11.Request) -> None:
        """Admit, read, forward and answer one request; raises _Refusal where it stops."""
        limits, gateway = self.limits, self.gateway
        path = request.target.decode("ascii", "replace")
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers]
        if request.method != b"POST" or not FLEET_PATH.fullmatch(path):
            raise _Refusal(403, "fedtrain serves only the Fleet API on this port")
        client: object = self.address
        if gateway.keys is not None and path not in NODE_LIFECYCLE:
            client = gateway.keys.authenticate(dict(headers))
            if client is None:  # the answer the SuperLink gives, so a SuperNode reacts as it would there
                raise _Refusal(401, "Invalid SuperNode authentication", json=True)
        limit = limits.body_limit(path)
        declared = next((int(v) for k, v in headers if k == "content-length" and v.isdigit()), None)
        if declared is not None and declared > limit:
            raise _Refusal(413, f"a body of at most {limit} bytes is accepted here")
        with gateway.slot(client, large=limit == limits.large_body):
            body = self._body(declared, limit)
            forwarded = [(k, v) for k, v in headers if k not in HOP_BY_HOP and k != "accept-encoding"]
            try:
                reply = gateway.client.post(path, content=body, headers=forwarded)
            except (httpx.HTTPError, RuntimeError):  # RuntimeError: the client closed as the server stops
                raise _Refusal(502, "the SuperLink did not answer") from None
            del body
            out = [(k, v) for k, v in reply.headers.multi_items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}]
            self._send(reply.status_code, reply.content, headers=out)

    def _body(self, declared: int | None, limit: int) -> bytes:
        """Read the body while it stays within `limit` bytes and its time."""
        if self.conn.they_are_waiting_for_100_continue:
            self.sock.sendall(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        deadline = time.monotonic() + self.limits.transfer_time(declared if declared is not None else limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = self._next(deadline, (h11.Data, h11.EndOfMessage))
            except TimeoutError:
                raise _Refusal(408, "the body came too slowly") from None
            except h11.RemoteProtocolError:
                raise _Refusal(400, "malformed body") from None
            if event is None:
                raise ConnectionError("closed in the middle of a body")
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            assert isinstance(event, h11.Data)
            size += len(event.data)
            if size > limit:
                raise _Refusal(413, f"a body of at most {limit} bytes is accepted here")
            chunks.append(bytes(event.data))

    def _next(self, deadline: float, wanted: type | tuple[type, ...]) -> Any:
        """The next h11 event of the wanted type(s), reading as needed until `deadline`; None at EOF.

        Raises:
            TimeoutError: the deadline passed, or read_timeout went by without a byte.
        """
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.sock.settimeout(min(remaining, self.limits.read_timeout))
                self.conn.receive_data(self.sock.recv(READ_SIZE))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, wanted):
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}", error_status_hint=400)

    def _send(
        self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None, close: bool = False
    ) -> None:
        """Write a whole reply within its time."""
        head = [*(headers or [("content-type", "text/plain; charset=utf-8")]), ("content-length", str(len(body)))]
        if close:
            head.append(("connection", "close"))
        data = self.conn.send(h11.Response(status_code=status, headers=head)) or b""
        data += (self.conn.send(h11.Data(data=body)) or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        deadline = time.monotonic() + self.limits.transfer_time(len(data))
        view = memoryview(data)
        for start in range(0, len(view), READ_SIZE):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            self.sock.sendall(view[start : start + READ_SIZE])

    def _linger(self) -> None:
        """Discard what the client still sends for a moment, so the refusal is read rather than reset."""
        deadline = time.monotonic() + LINGER
        with contextlib.suppress(OSError):
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                if not self.sock.recv(READ_SIZE):
                    return


class _Gateway:
    """Admission (connections, slots) and the forward to the SuperLink, shared by every connection."""

    def __init__(self, upstream: str, ca_file: Path | None, limits: GatewayLimits, keys: NodeKeys | None) -> None:
        self.limits, self.keys = limits, keys
        verify: ssl.SSLContext | bool = False  # --insecure: plain HTTP to a plain SuperLink on loopback
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
            verify.check_hostname = False  # the upstream is our own child on loopback; the CA still must match
        pool = limits.large_requests + limits.small_requests
        self.client = httpx.Client(
            base_url=upstream,
            verify=verify,
            timeout=httpx.Timeout(limits.upstream_timeout),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )
        self.large = threading.BoundedSemaphore(limits.large_requests)
        self.small = threading.BoundedSemaphore(limits.small_requests)
        self.lock = threading.Lock()
        self.connections: Counter[str] = Counter()
        self.in_flight: Counter[object] = Counter()
        self.open: set[socket.socket] = set()
        self.rates = _Rates(limits.requests_per_second, limits.request_burst)
        self.refused = _RefusalLog()

    def admit(self, sock: socket.socket, address: str) -> bool:
        with self.lock:
            if len(self.open) >= self.limits.max_connections:
                return False
            if self.connections[address] >= self.limits.connections_per_address:
                return False
            self.connections[address] += 1
            self.open.add(sock)
            return True

    def serve(self, raw: socket.socket, address: str, tls: ssl.SSLContext | None) -> None:
        sock = raw
        try:
            if tls is not None:
                sock = self._handshake(raw, tls)
            _Connection(self, sock, address).serve()
        except (OSError, ssl.SSLError, h11.ProtocolError):
            pass  # the client went away, stalled or spoke garbage: its connection just ends
        except Exception as error:  # noqa: BLE001 - one line in the log, not a thread's traceback
            log.warning("gateway: a connection from %s ended on %s: %s", address, type(error).__name__, error)
        finally:
            with self.lock:
                self.connections[address] -= 1
                if not self.connections[address]:
                    del self.connections[address]
                self.open.discard(raw)
            sock.close()

    def _handshake(self, raw: socket.socket, tls: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS, done within handshake_timeout in all (a client that dribbles its hello is cut off)."""
        deadline = time.monotonic() + self.limits.handshake_timeout
        sock = tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        sock.setblocking(False)
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                wait: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([sock], [])
            except ssl.SSLWantWriteError:
                wait = ([], [sock])
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(select.select(*wait, [], remaining)):
                raise TimeoutError
        sock.setblocking(True)
        return sock

    @contextlib.contextmanager
    def slot(self, client: object, large: bool):
        """Hold one of the requests in flight (per client, then in all) while a body is in memory."""
        with self.lock:
            if not self.rates.take(client):
                raise _Refusal(503, "too many requests per second from this client")
            if self.in_flight[client] >= self.limits.requests_per_client:
                raise _Refusal(503, "too many requests in flight from this client")
            self.in_flight[client] += 1
        slots = self.large if large else self.small
        try:
            if not slots.acquire(timeout=self.limits.queue_timeout):
                raise _Refusal(503, "the gateway is busy; retry")
            try:
                yield
            finally:
                slots.release()
        finally:
            with self.lock:
                self.in_flight[client] -= 1
                if not self.in_flight[client]:
                    del self.in_flight[client]

    def close(self) -> None:
        with self.lock:
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes its thread
        self.client.close()


class FleetGateway:
    """The public port, served by threads of the fedtrain server process."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream_port: int,
        tls: tuple[Path, Path, Path] | None,
        limits: GatewayLimits,
        node_keys: NodeKeys | None = None,
    ) -> None:
        """Args:
        host, port: the public address.
        upstream_port: the SuperLink's loopback port.
        tls: (certificate, key, CA); None only for an explicit --insecure server.
        limits: what clients may ask (fleet_limits.gateway_limits derives them from the run's model).
        node_keys: the SuperNodes' public keys, to refuse unsigned requests early; None without node auth.
        """
        self.host, self.port, self.limits = host, port, limits
        self.tls: ssl.SSLContext | None = None
        if tls is not None:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(str(tls[0]), str(tls[1]))
            self.tls.set_alpn_protocols(["http/1.1"])
        upstream = f"{'https' if tls else 'http'}://127.0.0.1:{upstream_port}"
        self.gateway = _Gateway(upstream, tls[2] if tls else None, limits, node_keys)
        self.listener: socket.socket | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="fleet-gateway", daemon=True)

    def start(self) -> None:
        """Listen on the public port.

        Raises:
            FedtrainError: the port could not be opened.
        """
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self.listener = socket.create_server((self.host, self.port), family=family, backlog=256)
        except OSError as error:
            raise FedtrainError(
                f"the Fleet gateway did not start on {self.host}:{self.port} ({error.strerror}); is the port free?"
            ) from None
        self.listener.settimeout(0.5)  # to notice stop()
        self.thread.start()

    def _accept(self) -> None:
        assert self.listener is not None
        while not self.stopping.is_set():
            try:
                raw, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.1)  # out of file descriptors, say: do not spin
                continue
            address = str(peer[0])
            if not self.gateway.admit(raw, address):
                self.gateway.refused("too many connections", address)
                raw.close()  # before any TLS: the cheapest refusal
                continue
            threading.Thread(target=self.gateway.serve, args=(raw, address, self.tls), daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the port and every connection; idempotent."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)
        if self.listener is not None:
            self.listener.close()
        self.gateway.close()
