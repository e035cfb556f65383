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


def sealed_size(plaintext_bytes: int) -> int:
    """Bytes of the envelope of a plaintext of `plaintext_bytes` bytes."""
    return HEADER_BYTES + plaintext_bytes + TAG_BYTES


def seal(key: bytes, plaintext: bytes | memoryview, associated_data: bytes) -> bytearray:
    """Encrypt and authenticate `plaintext`, binding it to `associated_data`.

    The ciphertext is written straight after the header in one buffer (no copy of a large model
    to prepend the header): the envelope is a bytearray, usable wherever bytes are."""
    envelope = bytearray(sealed_size(len(plaintext)))
    seal_into(key, plaintext, associated_data, memoryview(envelope))
    return envelope


def seal_into(key: bytes, plaintext: bytes | memoryview, associated_data: bytes, out: memoryview) -> None:
    """`seal`, written into `out` (exactly `sealed_size(len(plaintext))` bytes): a caller that frames
    envelopes in a larger buffer gets no copy of the ciphertext."""
    _check_key(key)
    if len(out) != sealed_size(len(plaintext)):
        raise ValueError(f"an envelope of {len(plaintext)} bytes takes {sealed_size(len(plaintext))} bytes")
    nonce = os.urandom(NONCE_BYTES)  # 96-bit random nonce: fresh per message, as GCM requires
    header = MAGIC + bytes([VERSION]) + key_id(key) + nonce
    out[:HEADER_BYTES] = header
    aead, aad = AESGCM(key), header + associated_data
    if hasattr(aead, "encrypt_into"):  # cryptography >= 45
        aead.encrypt_into(nonce, plaintext, aad, out[HEADER_BYTES:])
    else:
        out[HEADER_BYTES:] = aead.encrypt(nonce, bytes(plaintext), aad)


def open_sealed(
    key: bytes, envelope: bytes | bytearray | memoryview, associated_data: bytes, what: str = "the data"
) -> bytes:
    """Decrypt an envelope made by `seal`, or raise EnvelopeError saying why it cannot be opened."""
    view, nonce, aad = _opening(key, envelope, associated_data, what)
    try:
        return AESGCM(key).decrypt(nonce, view[HEADER_BYTES:], aad)
    except InvalidTag:
        raise _failed(what) from None


def _failed(what: str) -> EnvelopeError:
    return EnvelopeError(
        f"{what} failed authentication: it was modified, corrupted, or belongs to another run or round."
    )


def _opening(
    key: bytes, envelope: bytes | bytearray | memoryview, associated_data: bytes, what: str
) -> tuple[memoryview, bytes, bytes]:
    """(the envelope as a view, its nonce, the associated data to authenticate), after its header's checks."""
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
    return view, header[-NONCE_BYTES:], header + associated_data
