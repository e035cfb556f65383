"""The gateway's early check of SuperNode authentication, before it reads a request's body.

A SuperNode signs every Fleet request in three headers: its public key, a timestamp and an ECDSA
signature of that timestamp. The SuperLink checks them (and that the key is registered) only after
it has read the whole body. The gateway makes the same header check first, with Flower's own
constants and functions and against the kit's client keys (exactly the keys the server registers),
so an outsider's request is refused before any of its body is read, and each node's requests can be
counted by its verified key. The SuperLink still makes its full check on what passes.
"""

from __future__ import annotations

import binascii
import datetime
from base64 import b64decode
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

from fedtrain.errors import FedtrainError

_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class NodeKeys:
    """The public keys of the federation's SuperNodes."""

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)  # DER SubjectPublicKeyInfo

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> NodeKeys:
        """Read OpenSSH public keys (the kit's `clients/<name>.pub`).

        Raises:
            FedtrainError: a file is missing or holds no OpenSSH public key.
        """
        keys = []
        for path in paths:
            try:
                key = serialization.load_ssh_public_key(path.read_bytes())
            except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
                raise FedtrainError(
                    f"{path} holds no readable SuperNode public key; provision the kit again."
                ) from None
            keys.append(key.public_bytes(_DER, _SPKI))
        return cls(keys)

    def authenticate(self, headers: Mapping[str, str], now: datetime.datetime | None = None) -> bytes | None:
        """The node's key (DER) if the headers carry a fresh, valid signature by a known key, else None."""
        try:
            pem = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
            signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
            timestamp = headers[TIMESTAMP_HEADER]
            age = (now or datetime.datetime.now(datetime.timezone.utc)) - datetime.datetime.fromisoformat(timestamp)
            key = bytes_to_public_key(pem)
            der = key.public_bytes(_DER, _SPKI)
            # The SuperLink's window (flwr.superlink.routers.fleet.node_auth): never wider.
            fresh = -SYSTEM_TIME_TOLERANCE < age.total_seconds() < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE
            if der in self.keys and fresh and verify_signature(key, timestamp.encode("ascii"), signature):
                return der
        except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error, UnsupportedAlgorithm):
            pass
        return None
