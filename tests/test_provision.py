"""Kits from `fedtrain provision`, checked with independent tools: OpenSSL (Python's ssl module)
does a real TLS handshake against the server certificate, and Flower's own key loaders read the keys."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedtrain.errors import FedtrainError
from fedtrain.security.keys import read_key_file
from fedtrain.security.kits import provision, read_kit
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "kits"
    provision(out, ["127.0.0.1", "fl.example.org"], 3)
    return out


def _handshake(kits: Path, server_name: str, ca_file: Path) -> None:
    """TLS server on a free loopback port with the kit's certificate; a client that trusts `ca_file`."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(kits / "server" / "server.crt", kits / "server" / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("name", ["127.0.0.1", "fl.example.org"])
def test_openssl_accepts_the_server_certificate_for_every_host(kits: Path, name: str) -> None:
    _handshake(kits, name, kits / "client-1" / "ca.crt")


def test_openssl_refuses_a_name_not_provisioned(kits: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(kits, "evil.example.org", kits / "client-1" / "ca.crt")


def test_openssl_refuses_a_foreign_ca(kits: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    provision(other, ["127.0.0.1"], 1)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(kits, "127.0.0.1", other / "client-1" / "ca.crt")


def test_ca_is_a_ca_and_the_server_certificate_is_not(kits: Path) -> None:
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((kits / "server" / "server.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)


def test_node_keys_load_as_flower_loads_them(kits: Path) -> None:
    for name in ("client-1", "client-2", "client-3"):
        private = load_ssh_private_key((kits / name / "node.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        registered = load_ssh_public_key((kits / "server" / "clients" / f"{name}.pub").read_bytes())
        assert registered.public_numbers() == private.public_key().public_numbers()


def test_payload_keys_pair_up_and_secrets_are_owner_only(kits: Path) -> None:
    federation = read_key_file(kits / "server" / "federation.key")
    uplinks = set()
    for name in ("client-1", "client-2", "client-3"):
        assert read_key_file(kits / name / "federation.key") == federation
        uplink = read_key_file(kits / name / "uplink.key")
        assert read_key_file(kits / "server" / "clients" / f"{name}.uplink.key") == uplink
        uplinks.add(uplink)
        assert not (kits / name / "model.key").exists()
        assert not (kits / name / "server.key").exists()
    assert len(uplinks) == 3 and federation not in uplinks
    for path in kits.rglob("*"):
        if path.is_file() and path.suffix == ".key":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert read_kit(kits / "client-2", "client")["name"] == "client-2"
    with pytest.raises(FedtrainError, match="is a client kit, not a server kit"):
        read_kit(kits / "client-2", "server")


def test_passphrase_protects_private_keys(tmp_path: Path) -> None:
    out = tmp_path / "kits"
    provision(out, ["127.0.0.1"], 1, passphrase=b"correct horse")
    for path in (out / "client-1" / "node.key", out / "server" / "server.key", out / "ca" / "ca.key"):
        data = path.read_bytes()
        assert b"ENCRYPTED PRIVATE KEY" in data
        with pytest.raises((TypeError, ValueError)):
            load_pem_private_key(data, None)
        assert isinstance(load_pem_private_key(data, b"correct horse"), ec.EllipticCurvePrivateKey)


def test_cli_refuses_to_overwrite_and_bad_hosts(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kits"
    code, stdout, err = run_cli(
        ["provision", "--out", str(out), "--server-host", "127.0.0.1", "--clients", "2"], capsys
    )
    assert code == 0, err
    before = (out / "server" / "federation.key").read_bytes()
    code, _, err = run_cli(["provision", "--out", str(out), "--server-host", "127.0.0.1", "--clients", "2"], capsys)
    assert code == 2 and "is not empty" in err
    assert (out / "server" / "federation.key").read_bytes() == before
    code, _, err = run_cli(
        ["provision", "--out", str(tmp_path / "k2"), "--server-host", "a b", "--clients", "1"], capsys
    )
    assert code == 2 and "is not a host name or IP address" in err
    assert not (tmp_path / "k2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".k2")]
    code, _, err = run_cli(
        [
            "provision",
            "--out",
            str(tmp_path / "k3"),
            "--server-host",
            "h",
            "--clients",
            "1",
            "--passphrase-env",
            "NOPE_UNSET",
        ],
        capsys,
    )
    assert code == 2 and "NOPE_UNSET is empty or unset" in err
    os.environ.pop("NOPE_UNSET", None)
