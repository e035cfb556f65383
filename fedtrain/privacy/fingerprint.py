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


def identify(x: np.ndarray, y: np.ndarray) -> ShardIdentity:
    """The identity of the shard holding records (x[i], y[i]).

    Args:
        x: features, one row per record (any shape per record).
        y: labels or targets, one per record.

    Returns:
        Its ShardIdentity.
    """
    x = np.ascontiguousarray(x)
    y = np.ascontiguousarray(y)
    shape = repr((x.dtype.str, x.shape[1:], y.dtype.str, y.shape[1:])).encode()
    digests = sorted(
        hashlib.blake2b(
            x[i].tobytes() + b"|" + y[i].tobytes(), digest_size=DIGEST_BYTES, person=b"fedtrain-rec"
        ).digest()
        for i in range(len(y))
    )
    fingerprint = hashlib.sha256(shape + b"".join(digests)).hexdigest()
    short = np.unique(np.frombuffer(b"".join(d[:8] for d in digests), dtype="<u8"))
    return ShardIdentity(fingerprint, len(y), short)
