"""Check a kit completely before anything starts or connects.

Flower reports a damaged key or certificate late and vaguely ("the SuperNode exited with code 1",
"Connection to the SuperLink is unavailable"). Everything a kit holds is therefore read here
first, each defect with its own sentence: the kit's description, every key file's permissions and
contents, the CA and server certificates (parse, chain, match their private key), the node key
against its public half, each registered client key, and the federation's data description.
"""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import read_key_file
from fedtrain.security.kit_data import read_data_file
from fedtrain.security.kits import read_kit

PrivateKey = ec.EllipticCurvePrivateKey
REPROVISION = "copy it again from the kit `fedtrain provision` wrote"


@dataclass(frozen=True)
class CheckedKit:
    """A kit that passed every check.

    `unlocked` holds the decrypted private key for Flower (OpenSSH for a node, PKCS#8 PEM for the
    server's TLS key) when the kit's key is passphrase-protected, else None: Flower reads the file."""

    folder: Path
    info: dict
    data: Config | None
    unlocked: bytes | None


def check_client_kit(folder: Path, passphrase: bytes | None) -> CheckedKit:
    """Read and check every file of a client kit.

    Args:
        folder: the client's kit folder.
        passphrase: the node key's passphrase, if it is protected.

    Returns:
        The checked kit, with the node key decrypted when it was protected.

    Raises:
        FedtrainError: one sentence for the first defect found.
    """
    folder = Path(folder)
    info = read_kit(folder, "client")
    _ca_certificate(folder)
    node_key, protected = _private_key(_secret(folder, "node.key"), passphrase)
    node_pub = _public_key(_file(folder, "node.pub"))
    if _public_bytes(node_key.public_key()) != _public_bytes(node_pub):
        raise FedtrainError(
            f"{folder / 'node.key'} is damaged or not the pair of {folder / 'node.pub'}; {REPROVISION}."
        )
    for name in ("federation.key", "uplink.key"):
        read_key_file(_secret(folder, name))
    data = read_data_file(folder)
    openssh = serialization.PrivateFormat.OpenSSH
    return CheckedKit(folder, info, data, _plain(node_key, openssh) if protected else None)


def check_server_kit(folder: Path, passphrase: bytes | None) -> CheckedKit:
    """Read and check every file of a server kit.

    Args:
        folder: the server's kit folder.
        passphrase: the TLS key's passphrase, if it is protected.

    Returns:
        The checked kit, with the TLS key decrypted when it was protected.

    Raises:
        FedtrainError: one sentence for the first defect found.
    """
    folder = Path(folder)
    info = read_kit(folder, "server")
    ca = _ca_certificate(folder)
    server_crt = _file(folder, "server.crt")
    cert = _certificate(server_crt)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedtrainError(f"{server_crt} is damaged or not issued by {folder / 'ca.crt'}; {REPROVISION}.") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FedtrainError(
            f"{server_crt} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; provision new kits."
        )
    tls_key, protected = _private_key(_secret(folder, "server.key"), passphrase)
    if _public_bytes(tls_key.public_key()) != _public_bytes(cert.public_key()):
        raise FedtrainError(f"{folder / 'server.key'} is damaged or not the key of {server_crt}; {REPROVISION}.")
    for name in ("model.key", "federation.key"):
        read_key_file(_secret(folder, name))
    clients = info.get("clients")
    if not isinstance(clients, list) or not all(isinstance(name, str) for name in clients):
        raise FedtrainError(f"{folder / 'kit.json'} lists no clients; provision the kit again.")
    for name in clients:
        _public_key(_file(folder, f"clients/{name}.pub"))
        read_key_file(_secret(folder, f"clients/{name}.uplink.key"))
    data = read_data_file(folder)
    return CheckedKit(folder, info, data, _plain(tls_key, serialization.PrivateFormat.PKCS8) if protected else None)


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FedtrainError(f"the kit {folder} has no {name}; {REPROVISION}.")
    return path


def _secret(folder: Path, name: str) -> Path:
    """A secret file of the kit that only its owner can access."""
    path = _file(folder, name)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FedtrainError(f"{path} is accessible by other users (mode {mode:o}); run 'chmod 600 {path}'.")
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FedtrainError(f"cannot read {path} ({exc.strerror}).") from None


def _certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise FedtrainError(f"{path} is damaged: not a readable certificate; {REPROVISION}.") from None


def _ca_certificate(folder: Path) -> x509.Certificate:
    """The kit's CA: a readable, self-signed CA certificate (its signature covers every byte)."""
    path = _file(folder, "ca.crt")
    ca = _certificate(path)
    try:
        ca.verify_directly_issued_by(ca)
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        is_ca = False
    if not is_ca:
        raise FedtrainError(f"{path} is damaged: not a self-signed CA certificate; {REPROVISION}.")
    return ca


def _public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(_read(path).strip())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedtrainError(f"{path} is damaged: not a readable EC public key in OpenSSH format; {REPROVISION}.")
    return key


def _private_key(path: Path, passphrase: bytes | None) -> tuple[PrivateKey, bool]:
    """(the key, whether it was passphrase-protected); OpenSSH or PEM, as provision writes them."""
    data = _read(path)
    load: Callable = (
        serialization.load_ssh_private_key if data.lstrip().startswith(b"-----BEGIN OPENSSH") else _load_pem
    )
    protected = False
    try:
        key = load(data, None)
    except TypeError:  # encrypted, and no password given
        protected = True
        if not passphrase:
            raise FedtrainError(
                f"{path} is passphrase-protected; pass --passphrase-env VAR with the passphrase."
            ) from None
        try:
            key = load(data, passphrase)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise FedtrainError(f"the passphrase does not open {path} (or the file is damaged).") from None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, PrivateKey):
        raise FedtrainError(f"{path} is damaged: not a readable EC private key; {REPROVISION}.")
    return key, protected


def _load_pem(data: bytes, password: bytes | None) -> object:
    return serialization.load_pem_private_key(data, password)


def _public_bytes(key: object) -> bytes:
    """The key's public point; any other kind of key (not what provision makes) matches nothing."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _plain(key: PrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
