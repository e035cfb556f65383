"""Hand a decrypted private key to a Flower process without leaving it on disk.

Flower's SuperNode and SuperLink take key *paths* and cannot read an encrypted key. On Linux the
decrypted key goes into an anonymous memory file (memfd): the child inherits its descriptor under
the same number (`pass_fds`) and opens it as /proc/self/fd/N, a path that means the same file in
this process too. Nothing reaches a disk, and the file vanishes with the last process holding it,
SIGKILL included. Where memfd does not exist, the key goes into a 0700 folder of the temp
directory named after this process (fedtrain-<role>-<pid>-*): removed on a clean stop, and by the
next start of the same role when a crash left it behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from fedtrain.fileio import atomic_write_bytes

PROC_FD = Path("/proc/self/fd")


class HandedKey:
    """A decrypted key a child process can open at `path`; give it `pass_fds` and close() when done."""

    def __init__(self, path: Path, fds: tuple[int, ...], folder: Path | None) -> None:
        self.path = path
        self.pass_fds = fds
        self._folder = folder

    def close(self) -> None:
        """Forget the key: close the memory file, or remove the private folder; idempotent."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> HandedKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memory_files_available() -> bool:
    """True where keys can live in memory files (Linux: os.memfd_create and /proc/self/fd)."""
    return hasattr(os, "memfd_create") and PROC_FD.is_dir()


def hand_over(data: bytes, role: str, name: str) -> HandedKey:
    """Put a decrypted key where only this process and the children it passes it to can read it.

    Args:
        data: the decrypted key file's bytes.
        role: "node" or "server": names the fallback folder, so a later start can find leftovers.
        name: the key file's name (shown in /proc and, in the fallback, the file's name).

    Returns:
        A HandedKey; start children with `pass_fds=handed.pass_fds` and give them `handed.path`.
    """
    sweep_stale(role)
    if memory_files_available():
        fd = os.memfd_create(f"fedtrain-{role}-{name}", os.MFD_CLOEXEC)  # inherited only through pass_fds
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            raise
        return HandedKey(PROC_FD / str(fd), (fd,), None)
    folder = Path(tempfile.mkdtemp(prefix=f"fedtrain-{role}-{os.getpid()}-"))  # 0700
    return HandedKey(atomic_write_bytes(folder / name, data, mode=0o600), (), folder)


def sweep_stale(role: str) -> list[Path]:
    """Remove the fallback folders of `role` whose process is gone (it crashed before cleaning up).

    Returns:
        The folders removed.
    """
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"fedtrain-{role}-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or folder.is_symlink() or not folder.is_dir() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if folder.stat().st_uid != os.getuid():
                continue  # another user's folder: not ours to judge
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
