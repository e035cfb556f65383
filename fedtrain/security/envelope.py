"""AES-256-GCM envelope: the one format fedtrain uses for ciphertext, at rest and in transit.

Layout (all of the header is authenticated as associated data):

    b"FTE" | version (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext + 16-byte tag

The caller's associated data (run id, round, direction, kind...) is bound to the ciphertext
but not stored: opening with different associated data fails, which stops replay and mix-ups.
The key id lets us tell "wrong key" from "modified" without revealing anything about the key.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtrain.errors import FedtrainError

MAGIC = b"FTE"
VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + NONCE_BYTES


class EnvelopeError(FedtrainError):
    """Ciphertext that cannot be opened: wrong key, modified, truncated or not ours."""


def key_id(key: bytes) -> bytes:
    """A public fingerprint of a key (domain-separated SHA-256, first 8 bytes)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"fedtrain key id v1\x00" + key)
    return digest.finalize()[:KEY_ID_BYTES]


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise EnvelopeError("an encryption key must be 32 random bytes (AES-256); check the key file.")


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytearray:
    """Encrypt and authenticate `plaintext`, binding it to `associated_data`.

    The ciphertext is written straight after the header in one buffer (no copy of a large model
    to prepend the header): the envelope is a bytearray, usable wherever bytes are."""
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)  # 96-bit random nonce: fresh per message, as GCM requires
    header = MAGIC + bytes([VERSION]) + key_id(key) + nonce
    envelope = bytearray(HEADER_BYTES + len(plaintext) + TAG_BYTES)
    envelope[:HEADER_BYTES] = header
    aead, aad = AESGCM(key), header + associated_data
    if hasattr(aead, "encrypt_into"):  # cryptography >= 45
        aead.encrypt_into(nonce, plaintext, aad, memoryview(envelope)[HEADER_BYTES:])
    else:
        envelope[HEADER_BYTES:] = aead.encrypt(nonce, plaintext, aad)
    return envelope


def open_sealed(
    key: bytes, envelope: bytes | bytearray | memoryview, associated_data: bytes, what: str = "the data"
) -> bytes:
    """Decrypt an envelope made by `seal`, or raise EnvelopeError saying why it cannot be opened."""
    _check_key(key)
    if not isinstance(envelope, (bytes, bytearray, memoryview)) or len(envelope) < HEADER_BYTES + TAG_BYTES:
        raise EnvelopeError(f"{what} is truncated or not a fedtrain encrypted file.")
    view = memoryview(envelope)  # slices below are views: the ciphertext is never copied
    if view[: len(MAGIC)] != MAGIC:
        raise EnvelopeError(f"{what} is not a fedtrain encrypted file (bad magic bytes).")
    version = view[len(MAGIC)]
    if version != VERSION:
        raise EnvelopeError(
            f"{what} uses envelope format version {version}, which this fedtrain cannot read; upgrade fedtrain."
        )
    header = bytes(view[:HEADER_BYTES])
    stored_id = header[len(MAGIC) + 1 : len(MAGIC) + 1 + KEY_ID_BYTES]
    if stored_id != key_id(key):
        raise EnvelopeError(
            f"{what} was encrypted with a different key (key id {stored_id.hex()}, yours is "
            f"{key_id(key).hex()}); use the key it was written with."
        )
    nonce = header[-NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, view[HEADER_BYTES:], header + associated_data)
    except InvalidTag:
        raise EnvelopeError(
            f"{what} failed authentication: it was modified, corrupted, or belongs to another run or round."
        ) from None
