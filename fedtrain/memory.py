"""How this process's memory allocator treats large buffers (a leaf module: no fedtrain imports)."""

from __future__ import annotations

import contextlib
import ctypes
import sys

LARGE = 1 << 20  # bytes: buffers at least this large get their own pages


def return_large_buffers() -> None:
    """Large buffers (1 MiB and more: a batch of images, a chunk of a sealed payload) get their own pages
    and go back to the system when freed.

    glibc raises this threshold after each such free, then serves large buffers from a heap that
    fragments and keeps what was freed: a client's memory would grow with the number of batches its
    shard has, and a server opening a large update chunk by chunk would keep the chunks it already
    dropped. Setting the threshold fixes it (and stops the raising). Idempotent, process-wide.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator, its ways
            ctypes.CDLL("libc.so.6").mallopt(-3, LARGE)  # M_MMAP_THRESHOLD
