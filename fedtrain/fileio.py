"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fedtrain.errors import FedtrainError


def read_bytes(path: str | Path, what: str, missing_hint: str) -> bytes:
    """Read a file the user pointed to; a missing or unreadable one is a one-sentence error."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FedtrainError(f"{what} {path} does not exist; {missing_hint}.") from None
    except OSError as exc:
        raise FedtrainError(f"cannot read {what} {path} ({exc.strerror}).") from None


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview, mode: int = 0o644) -> Path:
    """Write `data` to `path` via temp file + fsync + rename (+ fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Text flavour of `atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY on dirs, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
