"""Compressed client updates: 8-bit or 4-bit quantisation (a scale per tensor or per block of values)
and top-k sparsification, encoded into one byte array the server decodes before aggregation.

What is compressed is the update d = w_local - w_t that DP-SGD already released: compression is
post-processing of a differentially private output and costs no privacy (docs/privacy.md). The
client keeps what compression dropped (error feedback: clients/update_compression.py); the server
never sees it.

Wire form, in a train reply: the "arrays" record holds one uint8 array (PACKED) and the "compression"
record names the mode, the block size and the tensors in the order they are packed (shapes and dtypes
come from the global model the server sent). Packed layouts, over the tensors' values concatenated:

    int8    float32 scale per block | int8 code per value                       value = code * scale
    int4    float32 scale per block | two 4-bit codes per byte (low nibble first) value = code * scale
    topk    uint32 index of each kept value (increasing) | float32 kept value

Quantisation is symmetric, round to nearest: scale = max |x| / 127 (int8) or / 7 (int4), per block of
`block` values of one tensor, or per tensor with block 0. Top-k keeps the `topk_fraction` of values
(at least one) with the largest magnitude over the whole update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedtrain.errors import FedtrainError

if TYPE_CHECKING:  # Flower only where records are built or read: the config checks a Compression without it
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

MODES = ("none", "int8", "int4", "topk")
PACKED = "packed"  # the one array of a compressed update
MODE, BLOCK, NAMES = "mode", "block", "names"  # its record (protocol.COMPRESSION)
_LEVELS = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class Compression:
    """How updates are compressed: `mode` (none, int8, int4, topk), values per scale (`block`, 0: one
    scale per tensor) and the share of values top-k keeps."""

    mode: str = "none"
    block: int = 256
    topk_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FedtrainError(f"compression must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if self.block < 0:
            raise FedtrainError(f"compression_block must be 0 (a scale per tensor) or more, not {self.block}.")
        if not 0 < self.topk_fraction <= 1:
            raise FedtrainError(f"topk_fraction must be in (0, 1], not {self.topk_fraction}.")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def sums_exactly(self) -> bool:
        """Whether a sum of decoded updates is what secure aggregation's masked sum gives: true for
        top-k (a sparse vector is summed as its dense form), false for quantisation, whose scales
        differ from client to client."""
        return self.mode in ("none", "topk")

    def encode(self, update: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the packed bytes, the update the server will decode from them).

        Args:
            update: floating tensors, by name, in the order they are packed.

        Returns:
            The uint8 array that travels and, by name, what `decode` gives back from it.

        Raises:
            FedtrainError: a tensor is not floating point, or the mode is "none".
        """
        if not self.active:
            raise FedtrainError("compression is off: there is nothing to encode.")
        names = list(update)
        for name in names:
            if not np.issubdtype(update[name].dtype, np.floating):
                raise FedtrainError(f"tensor {name} of the update is {update[name].dtype}, not floating point.")
        flat = [np.ascontiguousarray(update[name], dtype=np.float32).ravel() for name in names]
        packed = self._topk(flat) if self.mode == "topk" else self._quantise(flat)
        shapes = {name: update[name].shape for name in names}
        dtypes = {name: update[name].dtype for name in names}
        return packed, _decode(self.mode, self.block, packed, names, shapes, dtypes)

    def _quantise(self, flat: list[np.ndarray]) -> np.ndarray:
        levels = _LEVELS[self.mode]
        scales, codes = [], []
        for values in flat:
            bounds = _blocks(values.size, self.block)
            peaks = np.maximum.reduceat(np.abs(values), bounds[:-1]) if values.size else np.zeros(0, np.float32)
            scale = (peaks / levels).astype(np.float32)
            safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
            per_value = np.repeat(safe, np.diff(bounds))
            codes.append(np.clip(np.rint(values / per_value), -levels, levels).astype(np.int8))
            scales.append(scale)
        all_codes = np.concatenate(codes) if codes else np.zeros(0, np.int8)
        body = all_codes.view(np.uint8) if self.mode == "int8" else _pack_nibbles(all_codes)
        return np.concatenate([np.concatenate(scales).view(np.uint8) if scales else np.zeros(0, np.uint8), body])

    def _topk(self, flat: list[np.ndarray]) -> np.ndarray:
        values = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        if values.size >= 2**32:
            raise FedtrainError("top-k indexes values with 32 bits: this update has too many values.")
        k = min(values.size, max(1, math.ceil(self.topk_fraction * values.size)))
        kept = np.sort(np.argpartition(np.abs(values), values.size - k)[values.size - k :]) if k else np.zeros(0, int)
        return np.concatenate([kept.astype(np.uint32).view(np.uint8), values[kept].view(np.uint8)])


def _blocks(size: int, block: int) -> np.ndarray:
    """Block boundaries [0, b, 2b, ..., size] of a tensor of `size` values (one block if `block` is 0)."""
    step = block if block > 0 else max(size, 1)
    return np.append(np.arange(0, size, step), size).astype(np.int64)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit two's-complement codes per byte, low nibble first (an odd count ends on a zero nibble)."""
    nibbles = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, np.int8)
    nibbles[0::2] = (packed & 0x0F).astype(np.int8)
    nibbles[1::2] = (packed >> 4).astype(np.int8)
    nibbles = nibbles[:count]
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def packed_size(mode: str, block: int, sizes: list[int], kept: int | None = None) -> int:
    """Bytes of a packed update of tensors with `sizes` values (`kept` values for top-k)."""
    total = sum(sizes)
    if mode == "topk":
        return 8 * (kept if kept is not None else 0)
    scales = 4 * sum(len(_blocks(n, block)) - 1 for n in sizes)
    return scales + (total if mode == "int8" else (total + 1) // 2)


def _decode(
    mode: str,
    block: int,
    packed: np.ndarray,
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, np.dtype],
) -> dict[str, np.ndarray]:
    sizes = [math.prod(shapes[name]) for name in names]
    total = sum(sizes)
    if mode == "topk":
        if packed.size % 8:
            raise ValueError("a top-k update is not whole (index, value) pairs")
        kept = packed.size // 8
        indices = packed[: 4 * kept].view(np.uint32).astype(np.int64)
        values = packed[4 * kept :].view(np.float32)
        if kept and (indices[-1] >= total or np.any(np.diff(indices) <= 0)):
            raise ValueError("a top-k update's indices are out of range or not increasing")
        dense = np.zeros(total, np.float32)
        dense[indices] = values
    else:
        expected = packed_size(mode, block, sizes)
        if packed.size != expected:
            raise ValueError(f"the packed update has {packed.size} bytes, {expected} expected")
        bounds = [_blocks(n, block) for n in sizes]
        count = sum(len(b) - 1 for b in bounds)
        scales = packed[: 4 * count].view(np.float32)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise ValueError("the packed update's scales are not finite and non-negative")
        body = packed[4 * count :]
        codes = body.view(np.int8) if mode == "int8" else _unpack_nibbles(body, total)
        per_value = np.repeat(scales, np.concatenate([np.diff(b) for b in bounds]) if bounds else [])
        dense = codes.astype(np.float32) * per_value
    out, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = dense[start : start + size].reshape(shapes[name]).astype(dtypes[name], copy=False)
        start += size
    return out


def decode(
    packed: np.ndarray, mode: str, block: int, names: list[str], template: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The update a packed one stands for, its tensors shaped and typed as `template`'s.

    Args:
        packed: the uint8 array a client sent.
        mode, block, names: its compression record.
        template: the global model's tensors, by name.

    Returns:
        The decoded tensors, by name, in `names` order.

    Raises:
        ValueError: anything about the packed update that does not fit the template (the server's
            screening turns it into that client's rejected update).
    """
    if mode not in MODES or mode == "none":
        raise ValueError(f"unknown compression mode {mode!r}")
    if not isinstance(block, int) or isinstance(block, bool) or block < 0:
        raise ValueError(f"bad compression block {block!r}")
    if len(set(names)) != len(names) or not set(names) <= set(template):
        raise ValueError("the compressed update names tensors the global model does not have")
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError("a packed update must be one flat uint8 array")
    shapes = {name: np.shape(template[name]) for name in names}
    dtypes = {name: np.asarray(template[name]).dtype for name in names}
    if not all(np.issubdtype(d, np.floating) for d in dtypes.values()):
        raise ValueError("only floating tensors can be compressed")
    return _decode(mode, block, packed, names, shapes, dtypes)


# ---------------------------------------------------------------- in a train reply


def to_records(compression: Compression, packed: np.ndarray, names: list[str]) -> tuple[ArrayRecord, ConfigRecord]:
    """The reply's "arrays" record (the packed bytes) and its compression record."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    record = ConfigRecord({MODE: compression.mode, BLOCK: compression.block, NAMES: list(names)})
    return ArrayRecord({PACKED: Array(packed)}), record


def from_content(content: RecordDict, template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The decoded update of a train reply that carries a compressed one, or None when it carries a
    plain update (every tensor as itself).

    Raises:
        ValueError: a compression record that does not describe a packed update the template fits.
    """
    from fedtrain import protocol

    if protocol.COMPRESSION not in content.config_records:
        return None
    record = content.config_records[protocol.COMPRESSION]
    arrays = content.array_records.get(protocol.ARRAYS)
    if arrays is None or list(arrays.keys()) != [PACKED]:
        raise ValueError("a compressed update must be one packed array")
    names = record.get(NAMES, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("the compression record's tensor names are not a list of names")
    mode, block = record.get(MODE), record.get(BLOCK)
    return decode(arrays[PACKED].numpy(), str(mode), block, names, template)  # type: ignore[arg-type]
