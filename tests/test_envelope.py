"""AES-256-GCM envelopes: checked against `cryptography` itself, and every tampering fails clearly."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtrain.errors import FedtrainError
from fedtrain.security import envelope
from fedtrain.security.envelope import HEADER_BYTES, NONCE_BYTES, EnvelopeError, open_sealed, seal
from fedtrain.security.files import read_encrypted, write_encrypted
from fedtrain.security.keys import KEY_ENV, encode_key, load_model_key, read_key_file, write_key_file

KEY = bytes(range(32))
AAD = b"fedtrain|test|run=abc"
SECRET = b"weights that must never appear in plaintext " * 20


def test_envelope_is_standard_aes_gcm() -> None:
    sealed = seal(KEY, SECRET, AAD)
    header, body = sealed[:HEADER_BYTES], sealed[HEADER_BYTES:]
    assert header[:3] == b"FTE" and header[3] == envelope.VERSION
    # An independent decryption with the raw primitive proves the format is real AES-256-GCM.
    plain = AESGCM(KEY).decrypt(header[-NONCE_BYTES:], body, header + AAD)
    assert plain == SECRET
    assert SECRET[:32] not in sealed
    assert open_sealed(KEY, sealed, AAD) == SECRET


def test_nonces_are_fresh() -> None:
    assert seal(KEY, SECRET, AAD) != seal(KEY, SECRET, AAD)


def test_wrong_key_is_named_as_such() -> None:
    sealed = seal(KEY, SECRET, AAD)
    with pytest.raises(EnvelopeError, match="encrypted with a different key"):
        open_sealed(os.urandom(32), sealed, AAD)


@pytest.mark.parametrize("position", [0, 3, 5, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 10, -1])
def test_any_flipped_byte_fails(position: int) -> None:
    sealed = bytearray(seal(KEY, SECRET, AAD))
    sealed[position] ^= 0x01
    with pytest.raises(EnvelopeError):
        open_sealed(KEY, bytes(sealed), AAD)


def test_other_associated_data_fails() -> None:
    sealed = seal(KEY, SECRET, AAD)
    with pytest.raises(EnvelopeError, match="modified, corrupted, or belongs to another run"):
        open_sealed(KEY, sealed, b"fedtrain|test|run=other")


@pytest.mark.parametrize("blob", [b"", b"FTE", b"not an envelope at all, just some bytes here"])
def test_garbage_is_refused(blob: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_sealed(KEY, blob, AAD)


def test_encrypted_file_has_no_plaintext_and_owner_only_mode(tmp_path) -> None:
    path = write_encrypted(tmp_path / "model.ftenc", SECRET, KEY, AAD)
    raw = path.read_bytes()
    assert SECRET[:16] not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_encrypted(path, KEY, AAD) == SECRET
    assert [p.name for p in tmp_path.iterdir()] == ["model.ftenc"]  # no temp file left behind


def test_tampered_file_is_a_clear_error(tmp_path) -> None:
    path = write_encrypted(tmp_path / "model.ftenc", SECRET, KEY, AAD)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(FedtrainError, match="failed authentication"):
        read_encrypted(path, KEY, AAD)


def test_key_files(tmp_path, monkeypatch) -> None:
    path = write_key_file(tmp_path / "k" / "model.key", KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == KEY
    with pytest.raises(FedtrainError, match="refusing to overwrite"):
        write_key_file(path, os.urandom(32))
    os.chmod(path, 0o644)
    with pytest.raises(FedtrainError, match="chmod 600"):
        read_key_file(path)
    bad = tmp_path / "bad.key"
    bad.write_text("hello")
    os.chmod(bad, 0o600)
    with pytest.raises(FedtrainError, match="does not hold a fedtrain key"):
        read_key_file(bad)
    monkeypatch.setenv(KEY_ENV, encode_key(KEY))
    assert load_model_key(None).key == KEY


def test_local_key_store_is_created_once(isolated_home) -> None:
    with pytest.raises(FedtrainError, match="no model key found"):
        load_model_key(None)
    first = load_model_key(None, create_local=True)
    again = load_model_key(None, create_local=True)
    assert first.key == again.key and first.path == again.path
    assert isolated_home in first.path.parents
