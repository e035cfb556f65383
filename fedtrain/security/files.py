"""Encrypted files on disk: sealed envelopes written atomically with owner-only permissions."""

from __future__ import annotations

from pathlib import Path

from fedtrain.fileio import atomic_write_bytes, read_bytes
from fedtrain.security.envelope import open_sealed, seal


def file_context(kind: str, run_id: str) -> bytes:
    """Associated data for a file: what it is and which run it belongs to."""
    return f"fedtrain|file|kind={kind}|run={run_id}".encode()


def write_encrypted(path: str | Path, plaintext: bytes, key: bytes, associated_data: bytes) -> Path:
    """Seal `plaintext` and write it atomically (0600): plaintext never touches the disk."""
    return atomic_write_bytes(path, seal(key, plaintext, associated_data), mode=0o600)


def read_encrypted(path: str | Path, key: bytes, associated_data: bytes) -> bytes:
    """Read and open an encrypted file; every failure is a clear FedtrainError."""
    blob = read_bytes(path, "encrypted file", "check the run directory")
    return open_sealed(key, blob, associated_data, what=f"encrypted file {path}")
