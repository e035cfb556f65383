"""Key files: 32 random bytes, base64 in a 0600 file, or from an environment variable.

Lookup order for the model key: an explicit key file, then $FEDTRAIN_MODEL_KEY, then the local
key store ($FEDTRAIN_HOME, default ~/.fedtrain), which `simulate` fills once. A key never lies
beside what it protects, so it is never inside a run directory.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text
from fedtrain.security.envelope import KEY_BYTES, key_id

KEY_ENV = "FEDTRAIN_MODEL_KEY"
HOME_ENV = "FEDTRAIN_HOME"
PREFIX = "fedtrain-aes256gcm:"
LOCAL_KEY_NAME = "model.key"


@dataclass(frozen=True)
class ModelKey:
    """A key and where it came from (for messages; never print the key itself)."""

    key: bytes
    source: str
    path: Path | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.key).hex()


def fedtrain_home() -> Path:
    """fedtrain's per-user folder: $FEDTRAIN_HOME or ~/.fedtrain."""
    return Path(os.environ.get(HOME_ENV) or "~/.fedtrain").expanduser()


def generate_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def encode_key(key: bytes) -> str:
    return PREFIX + base64.urlsafe_b64encode(key).decode("ascii")


def decode_key(text: str, source: str) -> bytes:
    """Parse the text form of a key; a wrong form is a clear error."""
    text = text.strip()
    body = text[len(PREFIX) :] if text.startswith(PREFIX) else text
    try:
        key = base64.urlsafe_b64decode(body.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        key = b""
    if len(key) != KEY_BYTES:
        raise FedtrainError(
            f"{source} does not hold a fedtrain key (expected '{PREFIX}' and 32 bytes in base64); "
            "point to the right key or create one with a fresh FEDTRAIN_HOME."
        )
    return key


def write_key_file(path: str | Path, key: bytes) -> Path:
    """Write a new key file readable by its owner only; never overwrite an existing key."""
    path = Path(path)
    if path.exists():
        raise FedtrainError(f"key file {path} already exists; refusing to overwrite a key.")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return atomic_write_text(path, encode_key(key) + "\n", mode=0o600)


def read_key_file(path: str | Path) -> bytes:
    """Read a key file, refusing one that others can read."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise FedtrainError(f"key file {path} does not exist; check the path (--key-file).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FedtrainError(f"cannot read key file {path} ({exc}); check it is the right file.") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FedtrainError(
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run 'chmod 600 {path}'."
        )
    return decode_key(text, f"key file {path}")


def load_model_key(key_file: str | None, *, create_local: bool = False) -> ModelKey:
    """Find the model key: explicit file > $FEDTRAIN_MODEL_KEY > local key store."""
    if key_file:
        path = Path(key_file).expanduser()
        return ModelKey(read_key_file(path), f"key file {path}", path)
    if os.environ.get(KEY_ENV):
        return ModelKey(decode_key(os.environ[KEY_ENV], f"${KEY_ENV}"), f"${KEY_ENV}")
    local = fedtrain_home() / "keys" / LOCAL_KEY_NAME
    if local.exists():
        return ModelKey(read_key_file(local), f"key file {local}", local)
    if not create_local:
        raise FedtrainError(
            f"no model key found (no --key-file, no ${KEY_ENV}, nothing at {local}); "
            "give the key the model was encrypted with."
        )
    write_key_file(local, generate_key())
    return ModelKey(read_key_file(local), f"new key file {local}", local)
