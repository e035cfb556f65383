"""End-to-end payload envelopes: every record survives the round trip; replay into another round,
run, direction, node or client fails; a message that is not sealed is refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrain.errors import FedtrainError
from fedtrain.security.payload import SEALED, header_of, open_content, payload_context, seal_content

KEY = os.urandom(32)


def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": Array(np.ones(2))}),
            "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5, "hist": [1.0, 2.0]}),
            "privacy": ConfigRecord({"client-id": "client-1", "steps": [4, 4], "raw": b"\x00\x01", "ok": True}),
        }
    )


def test_round_trip_keeps_every_record() -> None:
    aad = payload_context(7, 3, "up", "train", 42, "client-1")
    sealed = seal_content(_content(), KEY, aad, {"round": 3, "client": "client-1"})
    assert set(sealed.array_records) == {SEALED}
    assert header_of(sealed) == {"round": 3, "client": "client-1"}
    opened = open_content(sealed, KEY, aad, "test")
    assert np.array_equal(opened["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert list(opened["arrays"].keys()) == ["w", "b"]
    assert dict(opened["metrics"]) == {"num-examples": 12, "train-loss": 0.5, "hist": [1.0, 2.0]}
    assert dict(opened["privacy"]) == {"client-id": "client-1", "steps": [4, 4], "raw": b"\x00\x01", "ok": True}
    assert np.arange(6, dtype=np.float32).tobytes() not in sealed[SEALED]["envelope"].numpy().tobytes()


@pytest.mark.parametrize(
    "other",
    [
        payload_context(8, 3, "up", "train", 42, "client-1"),  # another run
        payload_context(7, 2, "up", "train", 42, "client-1"),  # replayed from another round
        payload_context(7, 3, "down", "train", 42, "client-1"),  # reflected back down
        payload_context(7, 3, "up", "evaluate", 42, "client-1"),  # a train reply passed off as evaluate
        payload_context(7, 3, "up", "train", 43, "client-1"),  # from another node
        payload_context(7, 3, "up", "train", 42, "client-2"),  # claiming another client
    ],
)
def test_replay_and_mix_ups_fail(other: bytes) -> None:
    aad = payload_context(7, 3, "up", "train", 42, "client-1")
    sealed = seal_content(_content(), KEY, aad, {"round": 3, "client": "client-1"})
    with pytest.raises(FedtrainError, match="failed authentication"):
        open_content(sealed, KEY, other, "test")


def test_unsealed_message_is_refused() -> None:
    with pytest.raises(FedtrainError, match="not end-to-end encrypted"):
        open_content(_content(), KEY, b"x", "test")
