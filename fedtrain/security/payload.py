"""End-to-end payload encryption of Flower messages between the ServerApp and each ClientApp.

A message's whole content (weights, metrics, ledger) becomes a sequence of AES-256-GCM envelopes
(chunks) inside a single ArrayRecord; only the round and (upward) the client's name stay readable,
and both are bound as associated data together with the run id, the direction, the message type
and the node:

    fedtrain|payload|run=<run>|round=<r>|dir=down|type=train|node=<node>[|client=<name>]

So the SuperLink, its state database and anyone on the path hold only ciphertext, and a message
replayed into another round, run, direction or node fails to open.

Chunks, so that an update of hundreds of MB is sealed and opened with bounded memory (and never
one buffer the size of the message): chunk 0 holds the manifest (every record, the arrays without
their bytes, and each array's length); then each array's bytes follow in chunks of at most
`chunk_bytes`. Each chunk is its own envelope whose associated data adds the message's random id,
the chunk's index and the count (`|msg=<id>|chunk=<i>/<n>`): chunks cannot be dropped, reordered,
repeated or mixed in from another message. Sealing reads each array through a view and encrypts
into the chunk's own buffer; opening decrypts one chunk at a time, appends it to its array and drops
the chunk, so the message's ciphertext shrinks as its plaintext grows.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtrain.errors import FedtrainError
from fedtrain.memory import return_large_buffers
from fedtrain.security.envelope import open_sealed, seal_into, sealed_size

SEALED = "fedtrain.sealed"
HEADER = "fedtrain.envelope"
CHUNKS, MESSAGE = "chunks", "message"  # in the readable header: the chunk count and the message's random id
CHUNK_BYTES = 4 * 2**20  # plaintext per chunk: below Flower's 5 MiB transfer objects, so one object each
MANIFEST_MAGIC = b"FTM1"
return_large_buffers()  # a chunk dropped once read goes back to the system, not to a heap that keeps it


@dataclass(frozen=True)
class PayloadKeys:
    """`federation` seals what the server sends down; `uplink` holds each client's own key."""

    federation: bytes
    uplink: dict[str, bytes] = field(default_factory=dict)


def payload_context(
    run_id: int, server_round: int, direction: str, message_type: str, node_id: int, client: str = ""
) -> bytes:
    text = f"fedtrain|payload|run={run_id}|round={server_round}|dir={direction}|type={message_type}|node={node_id}"
    return (text + (f"|client={client}" if client else "")).encode()


# ---------------------------------------------------------------- RecordDict <-> bytes: Flower's serde


def records_to_bytes(content: RecordDict) -> bytes:
    """Every record of a message, serialised as Flower serialises it for the wire (protobuf; arrays as
    numpy .npy bytes, no pickle)."""
    return recorddict_to_proto(content).SerializeToString()


def bytes_to_records(data: bytes) -> RecordDict:
    """Parse what `records_to_bytes` wrote; every array is checked here (its .npy header against its
    declared shape and its length), so nothing malformed gets past this point (a crafted payload is
    refused with one sentence, never a crash later).

    Raises:
        FedtrainError: when the bytes are not a well-formed message.
    """
    content = _parse(data)
    check_arrays(content)
    return content


def _parse(data: bytes) -> RecordDict:
    try:
        proto = ProtoRecordDict()
        proto.ParseFromString(data)
        return recorddict_from_proto(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds on crafted bytes
        raise FedtrainError(f"a decrypted message is malformed ({type(exc).__name__}).") from None


def _npy_layout(array: Array) -> tuple[np.dtype, int]:
    """(dtype, offset of the values) of an array's .npy bytes, checked against its declared shape and
    its length without reading its values; ValueError if they disagree or hold Python objects."""
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unknown array serialisation {array.stype!r}")
    head = io.BytesIO(bytes(memoryview(array.data)[:65_536]))
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    else:
        raise ValueError(f".npy version {version}")
    if dtype.hasobject:
        raise ValueError("an array of Python objects")
    if list(shape) != list(array.shape):
        raise ValueError("an array's shape does not match its data")
    if len(array.data) != head.tell() + math.prod(shape) * dtype.itemsize:
        raise ValueError("an array's length does not match its shape")
    if fortran and len(shape) > 1:
        raise ValueError("a Fortran-ordered array")
    return dtype, head.tell()


def check_arrays(content: RecordDict) -> None:
    """Check every array of `content` (FedtrainError naming the first malformed one's defect)."""
    for record in content.array_records.values():
        for array in record.values():
            try:
                _npy_layout(array)
            except Exception as exc:  # noqa: BLE001 - numpy raises many kinds on crafted headers
                raise FedtrainError(f"a decrypted message is malformed ({type(exc).__name__}: {exc}).") from None


def array_view(array: Array) -> np.ndarray:
    """An array's values as a numpy view of its bytes, not a copy (read-only when its bytes are);
    `Array.numpy()` copies them, which a server opening updates of hundreds of MB cannot afford.

    Raises:
        ValueError: the array's bytes are not a .npy of its declared shape.
    """
    dtype, offset = _npy_layout(array)
    return np.frombuffer(array.data, dtype=dtype, count=math.prod(array.shape), offset=offset).reshape(array.shape)


# ---------------------------------------------------------------- sealing messages


def _chunk_context(associated_data: bytes, message: str, index: int, count: int) -> bytes:
    return associated_data + f"|msg={message}|chunk={index}/{count}".encode()


def _npy_header(length: int) -> bytes:
    """The .npy header of a flat uint8 array of `length` bytes (what Flower's Array holds before them)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": (length,)})
    return buffer.getvalue()


def _sealed_chunk(key: bytes, plaintext: memoryview | bytes, associated_data: bytes) -> Array:
    """One chunk's envelope as a flat uint8 Array, encrypted straight into the Array's own buffer."""
    size = sealed_size(len(plaintext))
    header = _npy_header(size)
    buffer = bytearray(len(header) + size)
    buffer[: len(header)] = header
    seal_into(key, plaintext, associated_data, memoryview(buffer)[len(header) :])
    return Array(dtype="uint8", shape=(size,), stype="numpy.ndarray", data=bytes(buffer))


def _manifest(content: RecordDict, lengths: list[int], chunk_bytes: int) -> bytes:
    skeleton = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            skeleton[name] = ArrayRecord(
                {k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=b"") for k, a in record.items()}
            )
        else:
            skeleton[name] = record
    proto = records_to_bytes(skeleton)
    return b"".join(
        [MANIFEST_MAGIC, struct.pack("<QQQ", chunk_bytes, len(proto), len(lengths)), proto,
         struct.pack(f"<{len(lengths)}Q", *lengths)]
    )  # fmt: skip


def _pieces(content: RecordDict, chunk_bytes: int, consume: bool) -> Iterator[memoryview]:
    """Each array's bytes in chunks (views, no copies); with `consume`, an array leaves its record as
    soon as its last chunk has been handed out (and sealed)."""
    for record in list(content.array_records.values()):
        for name in list(record.keys()):
            data = memoryview(record[name].data)
            for start in range(0, len(data), chunk_bytes):
                yield data[start : start + chunk_bytes]
            data.release()
            if consume:
                del record[name]


def seal_content(
    content: RecordDict,
    key: bytes,
    associated_data: bytes,
    header: dict[str, int | float | str],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    consume: bool = False,
) -> RecordDict:
    """The sealed form of `content`: its chunks as uint8 arrays, plus the readable header the AAD binds.

    Args:
        content: the message's records.
        key: the AES-256 key to seal with.
        associated_data: what the message is bound to (payload_context).
        header: what stays readable (round, client).
        chunk_bytes: plaintext bytes per chunk.
        consume: drop each array from `content` once sealed (the caller's content is its own and is
            replaced by the sealed form: memory stays near one copy of the message, not two).

    Returns:
        The sealed RecordDict.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    lengths = [len(a.data) for record in content.array_records.values() for a in record.values()]
    count = 1 + sum(math.ceil(n / chunk_bytes) for n in lengths)
    message = os.urandom(16).hex()
    chunks = ArrayRecord()
    chunks["0"] = _sealed_chunk(
        key, _manifest(content, lengths, chunk_bytes), _chunk_context(associated_data, message, 0, count)
    )
    for index, piece in enumerate(_pieces(content, chunk_bytes, consume), start=1):
        chunks[str(index)] = _sealed_chunk(key, piece, _chunk_context(associated_data, message, index, count))
        piece.release()
    return RecordDict({SEALED: chunks, HEADER: ConfigRecord({**header, CHUNKS: count, MESSAGE: message})})


def header_of(content: RecordDict) -> dict:
    """The readable header of a sealed message, or a FedtrainError if the message is not sealed."""
    if SEALED not in content.array_records or HEADER not in content.config_records:
        raise FedtrainError("the message is not end-to-end encrypted, and this federation requires it.")
    return {k: v for k, v in content.config_records[HEADER].items() if k not in (CHUNKS, MESSAGE)}


@dataclass
class _Manifest:
    chunk_bytes: int
    records: RecordDict
    arrays: list[Array] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def _read_manifest(plaintext: bytes, what: str) -> _Manifest:
    fixed = len(MANIFEST_MAGIC) + 24
    if len(plaintext) < fixed or plaintext[: len(MANIFEST_MAGIC)] != MANIFEST_MAGIC:
        raise FedtrainError(f"{what} is malformed (no manifest).")
    chunk_bytes, proto_bytes, count = struct.unpack_from("<QQQ", plaintext, len(MANIFEST_MAGIC))
    if chunk_bytes < 1 or len(plaintext) != fixed + proto_bytes + 8 * count:
        raise FedtrainError(f"{what} is malformed (its manifest's sizes do not add up).")
    records = _parse(plaintext[fixed : fixed + proto_bytes])
    arrays = [a for record in records.array_records.values() for a in record.values()]
    if len(arrays) != count:
        raise FedtrainError(f"{what} is malformed (its manifest's arrays do not add up).")
    lengths = list(struct.unpack_from(f"<{count}Q", plaintext, fixed + proto_bytes))
    return _Manifest(chunk_bytes, records, arrays, lengths)


def _envelope(array: Array) -> memoryview:
    """The envelope inside a chunk's .npy bytes (a view)."""
    _, offset = _npy_layout(array)
    return memoryview(array.data)[offset:]


def open_content(content: RecordDict, key: bytes, associated_data: bytes, what: str) -> RecordDict:
    """The plaintext records of a message sealed by `seal_content`; its chunks leave `content` as they
    are opened.

    Raises:
        FedtrainError: the message is not sealed, incomplete, modified, for another context, or malformed.
    """
    header_of(content)
    readable = content.config_records[HEADER]
    chunks = content.array_records[SEALED]
    count, message = readable.get(CHUNKS), readable.get(MESSAGE)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1 or not isinstance(message, str):
        raise FedtrainError(f"{what} is malformed (no chunk count or message id).")
    if list(chunks.keys()) != [str(i) for i in range(count)]:
        raise FedtrainError(f"{what} does not hold its {count} chunks in order; it was cut or padded on the way.")
    available = sum(len(chunk.data) for chunk in chunks.values())  # nothing is allocated beyond what arrived
    try:
        manifest = _read_manifest(
            open_sealed(key, _envelope(chunks.pop("0")), _chunk_context(associated_data, message, 0, count), what), what
        )
        step = manifest.chunk_bytes
        if count != 1 + sum(math.ceil(n / step) for n in manifest.lengths) or sum(manifest.lengths) > available:
            raise FedtrainError(f"{what} is malformed (its chunks do not match its manifest).")
        index = 1
        for array, length in zip(manifest.arrays, manifest.lengths, strict=True):
            data: bytes | bytearray = b""
            for start in range(0, length, step):
                context = _chunk_context(associated_data, message, index, count)
                piece = open_sealed(key, _envelope(chunks.pop(str(index))), context, what)
                index += 1
                if len(piece) != min(step, length - start):
                    raise FedtrainError(f"{what} is truncated or not the size its sender declared.")
                if length <= step:  # one chunk: the decrypted bytes are the array's, no copy
                    data = piece
                else:
                    # Grown in place as each chunk is read and dropped: the plaintext grows while the ciphertext
                    # shrinks, never both whole at once. It stays a bytearray (bytes of the whole array would
                    # need a second copy); it is read through numpy views and never serialised again.
                    data = data if isinstance(data, bytearray) else bytearray()
                    data += piece
            array.data = cast(bytes, data)
    except ValueError as exc:  # a chunk that is not a flat uint8 .npy
        raise FedtrainError(f"{what} is malformed ({exc}).") from None
    check_arrays(manifest.records)
    return manifest.records
