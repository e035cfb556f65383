"""A client's privacy ledger on its own disk, encrypted with its own key and keyed by run.

Flower keeps `context.state` only while the SuperNode process (or the simulation) lives. Without
this file a client that restarts would start again from epsilon 0; with it, a restarted client
resumes its ledger for the same run (and a tampered or foreign file is refused, never silently
reset). The run is fedtrain's run id, which the server sends with every round and keeps when a
run is resumed (Flower's own run id changes then). A real client uses its uplink key, a simulated
one the run's model key.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord

from fedtrain.clients.ledger import PrivacyLedger
from fedtrain.errors import FedtrainError
from fedtrain.security.files import file_context, read_encrypted, write_encrypted
from fedtrain.security.keys import fedtrain_home


def ledger_path(client: str, run_id: str) -> Path:
    return fedtrain_home() / "ledgers" / client / f"run-{run_id}.ftenc"


def _context(client: str, run_id: str) -> bytes:
    return file_context("ledger", f"{run_id}|client={client}")


def save(client: str, run_id: str, key: bytes, ledger: PrivacyLedger, plan: dict) -> Path:
    """Atomically write the ledger (and the noise plan) after every round the client trained."""
    record = ledger.to_config_record()
    payload = {"ledger": {k: record[k] for k in record}, "plan": plan}
    return write_encrypted(ledger_path(client, run_id), json.dumps(payload).encode(), key, _context(client, run_id))


def load(client: str, run_id: str, key: bytes) -> tuple[PrivacyLedger, dict] | None:
    """The stored ledger and plan of this client for this run, or None if it never trained in it."""
    path = ledger_path(client, run_id)
    if not path.exists():
        return None
    try:
        payload = json.loads(read_encrypted(path, key, _context(client, run_id)))
        ledger = PrivacyLedger.from_config_record(ConfigRecord(payload["ledger"]))
        plan = dict(payload.get("plan", {}))
    except (ValueError, KeyError, TypeError) as exc:
        raise FedtrainError(f"the privacy ledger {path} is damaged ({exc}); it cannot be trusted.") from None
    return ledger, plan
