"""A real client's ledger on disk: survives a restart, encrypted, bound to client and run."""

from __future__ import annotations

import os

import pytest

from fedtrain.clients import ledger_store
from fedtrain.clients.ledger import LedgerEntry, PrivacyLedger
from fedtrain.errors import FedtrainError

KEY = os.urandom(32)


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(delta=1e-5, entries=[LedgerEntry(1.3, 0.25, 8), LedgerEntry(1.3, 0.25, 8)], accountant="prv")


def test_round_trip_restores_the_same_epsilon() -> None:
    assert ledger_store.load("client-1", 77, KEY) is None
    path = ledger_store.save("client-1", 77, KEY, _ledger(), {"noise-multiplier": 1.3, "sample-rate": 0.25})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert b"noise" not in path.read_bytes()
    ledger, plan = ledger_store.load("client-1", 77, KEY)
    assert ledger.entries == _ledger().entries and ledger.epsilon() == pytest.approx(_ledger().epsilon())
    assert plan == {"noise-multiplier": 1.3, "sample-rate": 0.25}
    assert ledger_store.load("client-1", 78, KEY) is None  # another run starts its own ledger


def test_tampered_or_foreign_ledger_is_refused_not_reset() -> None:
    path = ledger_store.save("client-2", 5, KEY, _ledger(), {})
    with pytest.raises(FedtrainError, match="different key"):
        ledger_store.load("client-2", 5, os.urandom(32))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(FedtrainError, match="failed authentication"):
        ledger_store.load("client-2", 5, KEY)
    # a ledger copied over from another client does not open either
    ledger_store.save("client-3", 5, KEY, _ledger(), {})
    path.write_bytes(ledger_store.ledger_path("client-3", 5).read_bytes())
    with pytest.raises(FedtrainError, match="failed authentication"):
        ledger_store.load("client-2", 5, KEY)
