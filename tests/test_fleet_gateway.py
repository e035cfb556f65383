"""The public Fleet port on its own, in front of a stand-in SuperLink that records what reaches it:
what passes (Fleet POSTs, headers untouched, keep-alive), what is refused and when (before any body
is read), and every bound (body size, head and body time, connections, requests in flight)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.processes import free_port
from fedtrain.security.kits import provision
from fedtrain.security.payload import seal_content
from fedtrain.server.fleet_auth import NodeKeys
from fedtrain.server.fleet_gateway import FleetGateway
from fedtrain.server.fleet_limits import GatewayLimits, largest_body, model_values

LIMITS = GatewayLimits(
    large_body=256 * 1024,
    small_body=4096,
    head_timeout=1.0,
    read_timeout=1.0,
    queue_timeout=0.5,
    min_rate=64 * 1024,
    connections_per_address=4,
    requests_per_client=2,
    large_requests=1,
)


class Upstream:
    """A stand-in SuperLink on loopback: answers every POST with what it received."""

    def __init__(self, delay: float = 0.0, tls: tuple | None = None) -> None:
        self.seen: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                upstream.seen.append({"path": self.path, "size": len(body), "headers": dict(self.headers)})
                time.sleep(delay)
                reply = json.dumps({"size": len(body)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        if tls is not None:  # the SuperLink speaks TLS with the same certificate
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def gateway(
    limits: GatewayLimits = LIMITS, keys: NodeKeys | None = None, delay: float = 0.0, tls: tuple | None = None
) -> Iterator[tuple]:
    upstream = Upstream(delay, tls)
    port = free_port()
    gate = FleetGateway("127.0.0.1", port, upstream.port, tls, limits, keys)
    try:
        gate.start()
        yield port, upstream
    finally:
        gate.stop()
        upstream.stop()


def raw(port: int, data: bytes, source: str = "127.0.0.1", wait: float = 5.0) -> bytes:
    """Send `data` on a fresh connection and return everything the gateway answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait, source_address=(source, 0)) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


def post_head(path: str, length: int, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n{extra}\r\n".encode()


def test_fleet_posts_pass_with_their_headers_on_one_kept_alive_connection() -> None:
    with gateway() as (port, upstream), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        signed = {"flwr-public-key": "a2V5", "flwr-timestamp": "2026-01-01T00:00:00+00:00", "flwr-signature": "c2ln"}
        for path, size in [("/v1/fleet/push-object", 200_000), ("/v1/fleet/pull-messages", 4000)]:
            reply = client.post(path, content=os.urandom(size), headers=signed)
            assert reply.status_code == 200 and reply.json() == {"size": size}
        assert [(s["path"], s["size"]) for s in upstream.seen] == [
            ("/v1/fleet/push-object", 200_000),
            ("/v1/fleet/pull-messages", 4000),
        ]
        for seen in upstream.seen:
            assert {k: seen["headers"].get(k) for k in signed} == signed
        # The gateway reused its connection for the second request: keep-alive works through it.
        assert client.post("/v1/fleet/get-run", content=b"x").status_code == 200


def test_everything_but_a_fleet_post_is_refused_and_never_forwarded() -> None:
    with gateway() as (port, upstream), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for method, path in [
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"),
            ("GET", "/v1/fleet/pull-messages"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
            ("POST", "/v1/fleet/pull-messages?x=1"),
            ("POST", "/v1/runtime/pull-app-inputs"),
            ("POST", "/docs"),
        ]:
            assert client.request(method, path, content=b"{}").status_code == 403, (method, path)
    assert upstream.seen == []


def test_an_oversized_body_is_refused_by_its_length_or_as_it_streams() -> None:
    with gateway() as (port, upstream):
        # Declared too large: refused at once, before a byte of it is read.
        started = time.monotonic()
        answer = raw(port, post_head("/v1/fleet/pull-messages", 2**30))
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert time.monotonic() - started < 2
        assert raw(port, post_head("/v1/fleet/push-object", LIMITS.large_body + 1)).startswith(b"HTTP/1.1 413")
        # Chunked, no length: read until the limit, then refused (or cut off while the client still sends).
        head = b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        try:
            answer = raw(port, head + chunk * 64)  # 4 MiB offered, 256 KiB allowed
            assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway closed while the client was still sending
        # The small limit applies to every endpoint but push-object and push-messages.
        assert raw(port, post_head("/v1/fleet/send-node-heartbeat", 5000) + b"x" * 5000).startswith(b"HTTP/1.1 413")
    assert upstream.seen == []


def test_tls_requests_pass_and_a_stalled_handshake_is_cut_off(tmp_path: Path) -> None:
    """The public port speaks TLS with the kit's certificate; a client that never finishes its
    handshake is disconnected after handshake_timeout. The forward to the SuperLink is TLS too,
    checked against the kit's CA."""
    provision(tmp_path / "kits", ["127.0.0.1"], 1)
    server = tmp_path / "kits" / "server"
    tls = (server / "server.crt", server / "server.key", server / "ca.crt")
    limits = replace(LIMITS, handshake_timeout=1.0)
    with gateway(limits, tls=tls) as (port, upstream):
        started = time.monotonic()
        assert raw(port, b"\x16\x03\x01") == b""  # the first bytes of a ClientHello, then nothing
        assert time.monotonic() - started < limits.handshake_timeout + 2
        trust = ssl.create_default_context(cafile=str(server / "ca.crt"))
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trust, timeout=10) as client:
            assert client.post("/v1/fleet/get-run", content=b"x").json() == {"size": 1}
            assert client.post("/v1/control/list-runs", content=b"x").status_code == 403
    assert len(upstream.seen) == 1


def test_slow_clients_lose_their_connection() -> None:
    with gateway() as (port, upstream):
        # Slow-loris on the head: a partial request line, then nothing: closed within head_timeout.
        started = time.monotonic()
        assert raw(port, b"POST /v1/fleet/pull-messages HTTP/1.1\r\nhost:") == b""
        assert time.monotonic() - started < LIMITS.head_timeout + 2
        # An idle connection is closed too.
        started = time.monotonic()
        assert raw(port, b"") == b""
        assert time.monotonic() - started < LIMITS.head_timeout + 2
        # A body that stops coming: 408 after read_timeout.
        started = time.monotonic()
        assert raw(port, post_head("/v1/fleet/push-object", 1000) + b"x" * 10).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < LIMITS.read_timeout + 2
    assert upstream.seen == []


def test_connections_per_address_are_capped_and_other_addresses_still_served() -> None:
    with gateway() as (port, upstream), contextlib.ExitStack() as held:
        for _ in range(LIMITS.connections_per_address):
            sock = held.enter_context(socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)))
            sock.settimeout(5)
        time.sleep(0.3)  # the gateway has accepted them
        started = time.monotonic()
        assert raw(port, post_head("/v1/fleet/get-run", 1) + b"x", source="127.0.0.2") == b""  # closed unanswered
        assert time.monotonic() - started < 2
        assert raw(port, post_head("/v1/fleet/get-run", 1) + b"x").startswith(b"HTTP/1.1 200")  # 127.0.0.1
    assert len(upstream.seen) == 1


def test_requests_in_flight_are_capped_with_a_retryable_503() -> None:
    """One large-body slot (LIMITS.large_requests): a second push waits queue_timeout, then gets 503,
    which Flower's SuperNode retries; small requests have their own slots and still pass."""
    with gateway(delay=1.5) as (port, upstream):
        results: list[int] = []

        def push() -> None:
            with httpx.Client(timeout=10) as client:
                results.append(client.post(f"http://127.0.0.1:{port}/v1/fleet/push-object", content=b"x").status_code)

        first = threading.Thread(target=push)
        first.start()
        time.sleep(0.3)
        push()
        with httpx.Client(timeout=10) as client:
            assert client.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"x").status_code == 200
        first.join(10)
        assert sorted(results) == [200, 503]
    assert len(upstream.seen) == 2


def test_requests_per_second_are_capped_per_client_with_a_retryable_503() -> None:
    limits = replace(LIMITS, requests_per_second=1.0, request_burst=3)
    with gateway(limits) as (port, upstream), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        codes = [client.post("/v1/fleet/get-run", content=b"x").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 503 in codes[3:], codes
        time.sleep(1.2)  # the bucket refills at 1 request a second
        assert client.post("/v1/fleet/get-run", content=b"x").status_code == 200
        other = raw(port, post_head("/v1/fleet/get-run", 1) + b"x", source="127.0.0.2")
        assert other.startswith(b"HTTP/1.1 200")  # another client has its own bucket
    assert len(upstream.seen) == 3 + codes[3:].count(200) + 2


def _node_key(tmp_path: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / f"{name}.pub"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return key, path


def _signed(key: ec.EllipticCurvePrivateKey, age: float = 0.0) -> dict[str, str]:
    """The headers Flower's SuperNode adds (NodeAuthHttpInterceptor), with Flower's own functions."""
    stamp = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=age)).isoformat()
    return {
        "flwr-public-key": base64.b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(sign_message(key, stamp.encode("ascii"))).decode(),
    }


def test_with_node_auth_an_unsigned_request_is_refused_before_its_body(tmp_path: Path) -> None:
    member, member_pub = _node_key(tmp_path, "member")
    stranger, _ = _node_key(tmp_path, "stranger")
    keys = NodeKeys.from_files([member_pub])
    with gateway(keys=keys) as (port, upstream):
        started = time.monotonic()  # a 1 GiB body announced, none sent: the answer comes from the head alone
        assert raw(port, post_head("/v1/fleet/pull-messages", 2**30)).startswith(b"HTTP/1.1 401")
        assert time.monotonic() - started < 2
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.post("/v1/fleet/pull-messages", content=b"x", headers=_signed(stranger)).status_code == 401
            stale = _signed(member, age=400)  # outside Flower's window (300 s + 5 s)
            assert client.post("/v1/fleet/pull-messages", content=b"x", headers=stale).status_code == 401
            forged = {**_signed(member), "flwr-signature": _signed(stranger)["flwr-signature"]}
            assert client.post("/v1/fleet/pull-messages", content=b"x", headers=forged).status_code == 401
            assert client.post("/v1/fleet/pull-messages", content=b"x", headers=_signed(member)).status_code == 200
            # Node activation is the SuperLink's to answer (an unknown key gets its own words there).
            assert client.post("/v1/fleet/activate-node", content=b"x", headers=_signed(stranger)).status_code == 200
            refused = client.post("/v1/fleet/get-run", content=b"x")
            assert refused.status_code == 401 and refused.json() == {"detail": "Invalid SuperNode authentication"}
    assert [seen["path"] for seen in upstream.seen] == ["/v1/fleet/pull-messages", "/v1/fleet/activate-node"]


def test_node_keys_from_a_kit_file_that_is_not_a_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pub").write_text("not a key\n")
    with pytest.raises(FedtrainError, match="bad.pub holds no readable SuperNode public key"):
        NodeKeys.from_files([tmp_path / "bad.pub"])


def test_the_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        gate = FleetGateway("127.0.0.1", busy.getsockname()[1], 1, None, LIMITS)
        with pytest.raises(FedtrainError, match="did not start"):
            gate.start()
        gate.stop()


@pytest.mark.parametrize(("model", "hidden"), [("logistic", 32), ("cnn", 32), ("mlp", 16384)])
def test_the_largest_legitimate_request_fits_the_limit(model: str, hidden: int) -> None:
    """The largest message a client sends is a SecAgg+ masked reply (every value as int64) with
    fedtrain's records, sealed into one envelope; Flower pushes it object by object. Every
    push-object request it makes, measured with Flower's own objects and protobuf, fits the limit,
    which stays near it: small models get a small limit, large ones are capped by Flower's chunk."""
    values = model_values(Config(model=model, hidden=hidden, input_shape=[1, 8, 8], num_classes=10))
    ledger = [{"noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100}] * 1000  # a long-lived shard
    content = RecordDict(
        {
            "fitres.parameters": ArrayRecord({"masked": Array(np.zeros(values + 1, dtype=np.int64))}),
            "metrics": MetricRecord({"train-loss": 0.5, "num-examples": 1000, "epsilon": 2.5}),
            "privacy": ConfigRecord({"ledger": json.dumps(ledger), "client": "client-1"}),
        }
    )
    sealed = seal_content(content, os.urandom(32), b"aad", {"round": 1, "client": "client-1"})
    requests = [
        PushObjectRequest(node=Node(node_id=2**63 - 1), run_id=2**63 - 1, object_id=object_id,
                          object_content=obj.deflate(), session_id="s" * 64).ByteSize()
        for object_id, obj in get_all_nested_objects(sealed).items()
    ]  # fmt: skip
    limit = largest_body(values)
    assert max(requests) <= limit
    assert limit <= max(2 * max(requests), 512 * 1024)  # not wildly above what is needed


def test_limits_come_from_the_model() -> None:
    small = model_values(Config(model="logistic", input_shape=[1, 8, 8], num_classes=10))
    assert 0 < small < 10_000
    assert largest_body(small) < 512 * 1024  # a digits model: a third of a MiB
    assert largest_body(10**9) == largest_body(10**7)  # any large model: one Flower chunk
    assert replace(LIMITS, large_body=7).body_limit("/v1/fleet/push-object") == 7
    assert LIMITS.body_limit("/v1/fleet/pull-messages") == LIMITS.small_body
