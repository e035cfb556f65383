"""End-to-end payload encryption of Flower messages between the ServerApp and each ClientApp.

A message's whole content (weights, metrics, ledger) becomes one AES-256-GCM envelope inside a
single-array ArrayRecord; only the round and (upward) the client's name stay readable, and both are
bound as associated data together with the run id, the direction, the message type and the node:

    fedtrain|payload|run=<run>|round=<r>|dir=down|type=train|node=<node>[|client=<name>]

So the SuperLink, its state database and anyone on the path hold only ciphertext, and a message
replayed into another round, run, direction or node fails to open.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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


# ---------------------------------------------------------------- RecordDict <-> bytes (no pickle)


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _from_json(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def records_to_bytes(content: RecordDict) -> bytes:
    """Every record of a message: arrays as .npz members, metrics and configs as JSON."""
    arrays: dict[str, np.ndarray] = {}
    layout: dict[str, list[str]] = {}
    for key, record in content.array_records.items():
        layout[key] = []
        for name, array in record.items():
            arrays[f"a{len(arrays)}"] = array.numpy()
            layout[key].append(name)
    meta = {
        "arrays": layout,
        "metrics": {k: dict(r) for k, r in content.metric_records.items()},
        "configs": {k: {n: _jsonable(v) for n, v in r.items()} for k, r in content.config_records.items()},
    }
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.array(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def bytes_to_records(data: bytes) -> RecordDict:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            meta = json.loads(str(archive["__meta__"]))
            content = RecordDict()
            index = 0
            for key, names in meta["arrays"].items():
                record = ArrayRecord()
                for name in names:
                    record[name] = Array(np.array(archive[f"a{index}"]))
                    index += 1
                content[key] = record
            for key, values in meta["metrics"].items():
                content[key] = MetricRecord(values)
            for key, values in meta["configs"].items():
                content[key] = ConfigRecord({n: _from_json(v) for n, v in values.items()})
            return content
    except Exception as exc:  # noqa: BLE001 - zipfile alone raises a dozen kinds on crafted archives
        raise FedtrainError(f"a decrypted message is malformed ({type(exc).__name__}).") from None


# ---------------------------------------------------------------- sealing messages


def seal_content(content: RecordDict, key: bytes, associated_data: bytes, header: dict[str, int | str]) -> RecordDict:
    """The sealed form of `content`: one uint8 array, plus the readable header that the AAD binds."""
    envelope = seal(key, records_to_bytes(content), associated_data)
    return RecordDict(
        {
            SEALED: ArrayRecord({"envelope": Array(np.frombuffer(envelope, dtype=np.uint8))}),
            HEADER: ConfigRecord(header),
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
