"""Property tests: parsers of untrusted bytes never crash with an unhandled exception, and no
modified ciphertext ever decrypts."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedtrain.config import resolve
from fedtrain.errors import FedtrainError
from fedtrain.security.envelope import open_sealed, seal
from fedtrain.tensors import bytes_to_state_dict

KEY = os.urandom(32)
AAD = b"fedtrain|file|kind=model|run=fuzz"
PLAIN = os.urandom(200)
SEALED = seal(KEY, PLAIN, AAD)
SETTINGS = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(
    position=st.integers(0, len(SEALED) - 1),
    flip=st.integers(1, 255),
    cut=st.integers(0, len(SEALED)),
    extra=st.binary(max_size=8),
)
def test_no_modified_envelope_ever_opens(position: int, flip: int, cut: int, extra: bytes) -> None:
    variants = []
    changed = bytearray(SEALED)
    changed[position] ^= flip
    variants.append(bytes(changed))
    if cut < len(SEALED):
        variants.append(SEALED[:cut])
    if extra:
        variants.append(SEALED + extra)
    for blob in variants:
        try:
            open_sealed(KEY, blob, AAD)
        except FedtrainError:
            continue
        raise AssertionError("a modified envelope decrypted")


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes_never_crash_the_envelope_parser(blob: bytes) -> None:
    try:
        open_sealed(KEY, blob, AAD)
    except FedtrainError:
        return
    raise AssertionError("random bytes decrypted")


@settings(max_examples=500, deadline=None)
@given(blob=st.binary(max_size=400))
def test_random_bytes_never_crash_the_weights_parser(blob: bytes) -> None:
    with contextlib.suppress(FedtrainError):
        bytes_to_state_dict(blob)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_config_files_are_accepted_or_refused_clearly(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    try:
        resolve(path, {})
    except FedtrainError as exc:
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["rounds", "clients", "lr", "delta", "partition", "labels", "input_shape", "seed", "alpha"]),
    value=st.one_of(
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
        st.booleans(),
        st.lists(st.integers(-3, 3), max_size=3),
    ),
)
def test_any_typed_value_is_accepted_or_refused_clearly(tmp_path_factory, key: str, value: object) -> None:
    with contextlib.suppress(FedtrainError):
        resolve(None, {key: value})


# ---- checkpoints: the file a resumed run trusts ----

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A real run interrupted after round 1: its directory, config and checkpoint bytes."""
    from fedtrain.server.loop import Federation
    from tests.inprocess import flower_task
    from tests.test_resume import Killed, controlled, kill_after
    from tests.test_strategies import ControlledGrid

    config = controlled(tmp_path_factory.mktemp("ckpt"), rounds=3)
    with flower_task(), contextlib.suppress(Killed):
        Federation(config, on_round=kill_after(1)).run(ControlledGrid())
    path = Path(config.deployment.run_dir) / "checkpoint.ftenc"
    return config, path, path.read_bytes()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**9), flip=st.integers(1, 255), cut=st.integers(0, 10**9))
def test_no_modified_checkpoint_is_ever_resumed(checkpointed, position: int, flip: int, cut: int) -> None:
    from fedtrain.server.checkpoint import preflight

    config, path, original = checkpointed
    changed = bytearray(original)
    changed[position % len(original)] ^= flip
    for blob in (bytes(changed), original[: cut % len(original)]):
        path.write_bytes(blob)
        try:
            preflight(config)
        except FedtrainError:
            continue
        finally:
            path.write_bytes(original)
        raise AssertionError("a modified checkpoint was accepted")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["round", "rows", "privacy", "released", "accountant", "rng", "config", "format"]),
       value=_JSON)  # fmt: skip
@example(field="round", value=float("inf"))  # found by CI: int(inf) raised OverflowError
def test_a_checkpoint_with_malformed_contents_is_refused_clearly(checkpointed, field: str, value) -> None:
    """Properly sealed (as by a buggy or older fedtrain) but malformed inside: a clear refusal."""
    from fedtrain.security.files import file_context
    from fedtrain.security.keys import load_model_key
    from fedtrain.server import checkpoint
    from fedtrain.server.model_files import load_model
    from fedtrain.strategies import make_strategy
    from fedtrain.tensors import state_dict_to_bytes

    config, path, original = checkpointed
    key = load_model_key(config.deployment.key_file).key
    run_id = json.loads((path.parent / "run.json").read_text())["run_id"]
    tensors, meta = load_model(path, key, run_id, "checkpoint")
    meta[field] = value
    try:
        path.write_bytes(seal(key, state_dict_to_bytes(tensors, meta), file_context("checkpoint", run_id)))
        with contextlib.suppress(FedtrainError):
            checkpoint.load(path.parent, key, run_id, config, make_strategy(config))
    finally:
        path.write_bytes(original)


# ---- message records: what a decrypted payload turns back into ----


@settings(max_examples=1000, deadline=None)
@given(
    dtype=st.sampled_from(["<f4", "<i8", "|O", "<U3", "garbage", ""]),
    shape=st.lists(st.integers(-2, 5), max_size=4),
    stype=st.sampled_from(["numpy.ndarray", "torch.tensor", ""]),
    data=st.binary(max_size=256),
    well_formed=st.booleans(),
)
def test_malformed_message_records_are_refused_clearly(dtype, shape, stype, data, well_formed) -> None:
    """A payload that decrypts (its sender holds a key) but whose records are nonsense: arrays whose
    declared dtype, shape or type disagree with their bytes, or bytes that are a real .npy of another
    shape or of Python objects. Parsed, and every array decoded, or refused with one sentence."""
    import io

    import numpy as np
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from fedtrain.security.payload import bytes_to_records

    if well_formed:  # a real .npy (of another shape, or of objects) behind the declared header
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3) if dtype != "|O" else np.array([None], dtype=object), allow_pickle=True)
        data = buffer.getvalue()
    proto = ProtoRecordDict()
    item = proto.items.add()
    item.key = "arrays"
    array_item = item.array_record.items.add()
    array_item.key = "w"
    array_item.value.dtype, array_item.value.stype, array_item.value.data = dtype, stype, data
    array_item.value.shape.extend(shape)
    with contextlib.suppress(FedtrainError):
        content = bytes_to_records(proto.SerializeToString())
        for record in content.array_records.values():  # what bytes_to_records let through decodes
            for array in record.values():
                array.numpy()


@settings(max_examples=1000, deadline=None)
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_modified_message_records_are_refused_clearly(position: int, flip: int) -> None:
    from fedtrain.security.payload import bytes_to_records

    blob = bytearray(_RECORDS)
    blob[position % len(blob)] ^= flip
    with contextlib.suppress(FedtrainError):
        bytes_to_records(bytes(blob))


def _records() -> bytes:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedtrain.security.payload import records_to_bytes

    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5}),
            "privacy": ConfigRecord({"client-id": "c", "steps": [1, 2], "blob": b"\x00\x01"}),
        }
    )
    return records_to_bytes(content)


_RECORDS = _records()


@settings(max_examples=1000, deadline=None)
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_modified_weights_archives_are_refused_clearly(position: int, flip: int) -> None:
    """The plaintext of a model file, damaged (as by a bug, or by someone holding the key)."""
    blob = bytearray(_WEIGHTS)
    blob[position % len(blob)] ^= flip
    with contextlib.suppress(FedtrainError):
        bytes_to_state_dict(bytes(blob))


def _weights() -> bytes:
    import torch

    from fedtrain.tensors import state_dict_to_bytes

    return state_dict_to_bytes({"w": torch.ones(2, 3), "b": torch.zeros(3)}, {"round": 1})


_WEIGHTS = _weights()
