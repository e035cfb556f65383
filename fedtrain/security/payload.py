"""End-to-end payload encryption of Flower messages between the ServerApp and each ClientApp.

A message's whole content (weights, metrics, ledger) becomes one AES-256-GCM envelope inside a
single-array ArrayRecord; only the round and (upward) the client's name stay readable, and both are
bound as associated data together with the run id, the direction, the message type and the node:

    fedtrain|payload|run=<run>|round=<r>|dir=down|type=train|node=<node>[|client=<name>]

So the SuperLink, its state database and anyone on the path hold only ciphertext, and a message
replayed into another round, run, direction or node fails to open.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtrain.errors import FedtrainError
from fedtrain.security.envelope import open_sealed, seal

SEALED = "fedtrain.sealed"
HEADER = "fedtrain.envelope"


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
    """Parse what `records_to_bytes` wrote; every array is decoded once here, so nothing malformed
    gets past this point (a crafted payload is refused with one sentence, never a crash later).

    Raises:
        FedtrainError: when the bytes are not a well-formed message.
    """
    try:
        proto = ProtoRecordDict()
        proto.ParseFromString(data)
        content = recorddict_from_proto(proto)
        for record in content.array_records.values():
            for array in record.values():
                if list(array.numpy().shape) != list(array.shape):
                    raise ValueError("an array's shape does not match its data")
        return content
    except Exception as exc:  # noqa: BLE001 - protobuf and numpy raise many kinds on crafted bytes
        raise FedtrainError(f"a decrypted message is malformed ({type(exc).__name__}).") from None


# ---------------------------------------------------------------- sealing messages


def seal_content(
    content: RecordDict, key: bytes, associated_data: bytes, header: dict[str, int | float | str]
) -> RecordDict:
    """The sealed form of `content`: one uint8 array, plus the readable header that the AAD binds."""
    envelope = seal(key, records_to_bytes(content), associated_data)
    return RecordDict(
        {
            SEALED: ArrayRecord({"envelope": Array(np.frombuffer(envelope, dtype=np.uint8))}),
            HEADER: ConfigRecord(dict(header)),
        }
    )


def header_of(content: RecordDict) -> dict:
    """The readable header of a sealed message, or a FedtrainError if the message is not sealed."""
    if SEALED not in content.array_records or HEADER not in content.config_records:
        raise FedtrainError("the message is not end-to-end encrypted, and this federation requires it.")
    return dict(content.config_records[HEADER])


def open_content(content: RecordDict, key: bytes, associated_data: bytes, what: str) -> RecordDict:
    header_of(content)
    envelope = content.array_records[SEALED]["envelope"].numpy().tobytes()
    return bytes_to_records(open_sealed(key, envelope, associated_data, what=what))
