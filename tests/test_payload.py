"""End-to-end payload envelopes: every record survives the round trip, in one chunk or many; replay into
another round, run, direction, node or client fails, and so does a message whose chunks were dropped,
reordered, repeated or swapped with another message's; a message that is not sealed is refused."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtrain.errors import FedtrainError
from fedtrain.security.payload import (
    CHUNK_BYTES,
    HEADER,
    SEALED,
    array_view,
    header_of,
    open_content,
    payload_context,
    seal_content,
)

KEY = os.urandom(32)


def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": Array(np.ones(2))}),
            "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5, "hist": [1.0, 2.0]}),
            "privacy": ConfigRecord({"client-id": "client-1", "steps": [4, 4], "raw": b"\x00\x01", "ok": True}),
        }
    )


def _ciphertext(sealed: RecordDict) -> bytes:
    return b"".join(chunk.numpy().tobytes() for chunk in sealed[SEALED].values())


@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 7])
def test_round_trip_keeps_every_record(chunk_bytes: int) -> None:
    aad = payload_context(7, 3, "up", "train", 42, "client-1")
    sealed = seal_content(_content(), KEY, aad, {"round": 3, "client": "client-1"}, chunk_bytes=chunk_bytes)
    assert set(sealed.array_records) == {SEALED}
    assert header_of(sealed) == {"round": 3, "client": "client-1"}
    plain = _content()
    arrays = sum(len(a.data) for a in plain["arrays"].values())
    expected = 1 + sum(-(-len(a.data) // chunk_bytes) for a in plain["arrays"].values())
    assert len(sealed[SEALED]) == expected  # a manifest, then each array in chunks
    ciphertext = _ciphertext(sealed)
    assert len(ciphertext) > arrays
    opened = open_content(sealed, KEY, aad, "test")
    assert np.array_equal(opened["arrays"]["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert list(opened["arrays"].keys()) == ["w", "b"]
    assert dict(opened["metrics"]) == {"num-examples": 12, "train-loss": 0.5, "hist": [1.0, 2.0]}
    assert dict(opened["privacy"]) == {"client-id": "client-1", "steps": [4, 4], "raw": b"\x00\x01", "ok": True}
    assert np.arange(6, dtype=np.float32).tobytes()[:7] not in ciphertext
    assert len(sealed[SEALED]) == 0  # every chunk was dropped once opened


def test_an_array_larger_than_a_chunk_is_rebuilt_in_place() -> None:
    big = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float32)
    content = RecordDict({"arrays": ArrayRecord({"big": Array(big), "small": Array(np.ones(2))})})
    sealed = seal_content(content, KEY, b"ctx", {"round": 1}, chunk_bytes=1000, consume=True)
    assert len(content["arrays"]) == 0  # consumed: each array left once sealed
    opened = open_content(sealed, KEY, b"ctx", "test")
    assert np.array_equal(opened["arrays"]["big"].numpy(), big)
    assert np.array_equal(array_view(opened["arrays"]["big"]), big)
    assert np.array_equal(opened["arrays"]["small"].numpy(), np.ones(2))


def _chunked() -> RecordDict:
    return seal_content(_content(), KEY, b"ctx", {"round": 1}, chunk_bytes=16)


def _reordered(sealed: RecordDict) -> None:
    chunks = sealed[SEALED]
    chunks["1"], chunks["2"] = chunks["2"], chunks["1"]


def _dropped_last(sealed: RecordDict) -> None:
    chunks = sealed[SEALED]
    last = str(len(chunks) - 1)
    del chunks[last]
    sealed[HEADER]["chunks"] = len(chunks)  # the relay also fixes the readable count: the AAD still binds it


def _repeated(sealed: RecordDict) -> None:
    sealed[SEALED]["3"] = sealed[SEALED]["2"]


def _from_another_message(sealed: RecordDict) -> None:
    sealed[SEALED]["2"] = _chunked()[SEALED]["2"]  # same content, context and position, other message


def _extra(sealed: RecordDict) -> None:
    sealed[SEALED][str(len(sealed[SEALED]))] = sealed[SEALED]["1"]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_reordered, "failed authentication"),
        (_dropped_last, "failed authentication"),
        (_repeated, "failed authentication"),
        (_from_another_message, "failed authentication"),
        (_extra, "does not hold its"),
    ],
)
def test_chunks_cannot_be_cut_reordered_repeated_or_swapped(change, words: str) -> None:
    sealed = _chunked()
    change(sealed)
    with pytest.raises(FedtrainError, match=words):
        open_content(sealed, KEY, b"ctx", "test")


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
