"""Which data a ledger covers: a shard's fingerprint and its records' digests.

A lifetime ledger is keyed by the shard's contents, not by a file name or a run: the same records,
in any order or file format, are the same shard. Each record also gets a short digest, so a shard
that shares records with one seen before (a record added, a file re-cut) is found, and the
ledgers of both compose: a record in two shards has spent what was run on each.

Digests never leave the client: they are kept only inside its sealed ledger.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DIGEST_BYTES = 16


@dataclass(frozen=True)
class ShardIdentity:
    """A shard's fingerprint (hex SHA-256 of its sorted record digests) and the digests' first 8
    bytes as sorted unique uint64 (what overlap tests compare)."""

    fingerprint: str
    records: int
    digests: np.ndarray

    def overlaps(self, other_digests: np.ndarray) -> bool:
        """Whether any record of this shard is among `other_digests` (sorted uint64)."""
        if not len(self.digests) or not len(other_digests):
            return False
        positions = np.searchsorted(other_digests, self.digests)
        positions[positions == len(other_digests)] = 0
        return bool(np.any(other_digests[positions] == self.digests))


def identify(dataset: Records, batch: int = 256) -> ShardIdentity:
    """The identity of a shard, from its records as fedtrain reads them (float32 features, targets),
    so the same records in another file format are the same shard. Read a batch at a time.

    Args:
        dataset: the shard (anything with `len` and `batch(indices) -> (features, targets)`).
        batch: records read at a time.

    Returns:
        Its ShardIdentity.
    """
    # one array for every digest, allocated once: thousands of small objects kept between batches
    # would pin the heap's pages, and a client's memory would grow with its shard
    digests = np.zeros((len(dataset), DIGEST_BYTES), dtype=np.uint8)
    shape = b""
    for start in range(0, len(dataset), batch):
        x, y = dataset.batch(np.arange(start, min(start + batch, len(dataset))))
        x, y = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)
        shape = shape or repr((x.shape[1:], y.dtype.str, y.shape[1:])).encode()
        for i in range(len(y)):
            digests[start + i] = np.frombuffer(_digest(x[i].tobytes() + b"|" + y[i].tobytes()), dtype=np.uint8)
    ordered = np.sort(digests.view(f"V{DIGEST_BYTES}").ravel())
    fingerprint = hashlib.sha256(shape + ordered.tobytes()).hexdigest()
    short = np.unique(np.ascontiguousarray(digests[:, :8]).view("<u8").ravel())
    return ShardIdentity(fingerprint, len(digests), short)


def _digest(record: bytes) -> bytes:
    return hashlib.blake2b(record, digest_size=DIGEST_BYTES, person=b"fedtrain-rec").digest()


class Records(Protocol):
    """What `identify` reads: a length and batches of (features, targets)."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
