"""Property tests: parsers of untrusted bytes never crash with an unhandled exception, and no
modified ciphertext ever decrypts."""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, given, settings
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
