"""A client's lifetime ledger: every run over the same shard composes into one epsilon.

The store is one sealed file per client (AES-256-GCM under a key only the client holds: its kit's
`ledger.key`; a simulation's clients use the run's model key), rewritten atomically after every
release. It holds, per shard fingerprint, the runs that used the shard, each with its plan and its
entries; the shard's records' digests are sealed beside it, once per shard.

Nothing is ever taken as a fresh start:
- a store that fails to open (another client's, edited, damaged) is refused;
- the store carries a counter, raised by every write, and a real client's kit keeps an *anchor* (a
  second sealed file holding the last counter, written by `fedtrain provision` with 0): a store that
  is missing while the anchor says something was recorded, or older than the anchor (a backup put
  back), is refused. A crash between the two writes leaves the store one ahead, which is accepted.
What this cannot see: the store and the anchor both put back to an earlier state together.

The lifetime epsilon of a shard composes the entries of every run over it *and* over every stored
shard that shares a record with it (fingerprint.py): a record in both has spent what ran on each.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.errors import FedtrainError
from fedtrain.privacy.calibration import RunPlan
from fedtrain.privacy.fingerprint import ShardIdentity
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtrain.security.files import read_encrypted, write_encrypted

FORMAT = 1
STORE_FILE, ANCHOR_FILE = "ledger.ftenc", "ledger.anchor"


def _context(kind: str, client: str, extra: str = "") -> bytes:
    return f"fedtrain|ledger|kind={kind}|client={client}{extra}".encode()


def write_anchor(path: Path, key: bytes, client: str, counter: int) -> None:
    """Seal the store's counter into the anchor file (what provision does with counter 0)."""
    write_encrypted(path, json.dumps({"counter": counter}).encode(), key, _context("anchor", client))


@dataclass
class RunView:
    """What one run over one shard has spent, and everything the shard has spent in its lifetime."""

    shard: ShardIdentity
    run: str
    plan: RunPlan | None
    run_entries: list[LedgerEntry]
    lifetime_entries: list[LedgerEntry]  # every run over this shard and shards sharing records with it
    runs_before: int  # other runs over this shard (and overlapping shards)

    def run_ledger(self, delta: float, accountant: str) -> PrivacyLedger:
        return PrivacyLedger(delta, list(self.run_entries), accountant)

    def lifetime_ledger(self, delta: float, accountant: str) -> PrivacyLedger:
        return PrivacyLedger(delta, list(self.lifetime_entries), accountant)


class LedgerStore:
    """One client's lifetime ledger: sealed on disk (`folder` given) or in memory (tests).

    Args:
        client: the client's name (bound into the encryption, so stores cannot be swapped).
        folder: where the sealed store lives; None keeps it in `memory`.
        key: the 32-byte key sealing it (required with a folder).
        anchor: the anchor file (a real client's kit); None: no anchor (simulation, tests).
        memory: the dict an in-memory store lives in (shared by the nodes of one in-process test).
    """

    def __init__(
        self,
        client: str,
        folder: Path | None = None,
        key: bytes | None = None,
        anchor: Path | None = None,
        memory: dict[str, Any] | None = None,
    ) -> None:
        if folder is not None and key is None:
            raise ValueError("a ledger store on disk needs its key")
        self.client, self.folder, self.key, self.anchor = client, folder, key, anchor
        self.memory = memory if memory is not None else {}

    # ------------------------------------------------------------------ reading

    @property
    def path(self) -> Path | None:
        return self.folder / STORE_FILE if self.folder is not None else None

    def check(self) -> int:
        """Open the store and compare it with its anchor; its counter (0 for none yet).

        Raises:
            FedtrainError: the store does not open, is missing or older than its anchor, or the
                anchor is missing or does not open.
        """
        return int(self._load()["counter"])

    def _anchor_counter(self) -> int | None:
        if self.anchor is None:
            return None
        if not self.anchor.exists():
            raise FedtrainError(
                f"the ledger anchor {self.anchor} is missing, so a lost or rolled-back privacy ledger could not be "
                "detected; restore the kit's ledger.anchor from its backup (or provision a new kit and data)."
            )
        assert self.key is not None
        try:
            return int(json.loads(read_encrypted(self.anchor, self.key, _context("anchor", self.client)))["counter"])
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise FedtrainError(f"the ledger anchor {self.anchor} is damaged ({exc}); restore it.") from None

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return self.memory.setdefault(self.client, _empty(self.client))
        anchored = self._anchor_counter()
        if not self.path.exists():
            if anchored:
                raise FedtrainError(
                    f"this client's privacy ledger {self.path} is missing, but its anchor says it was written "
                    f"{anchored} times; restore the ledger (fedtrain never starts a shard's epsilon again from 0)."
                )
            return _empty(self.client)
        assert self.key is not None
        try:
            state = json.loads(read_encrypted(self.path, self.key, _context("store", self.client)))
            if state.get("format") != FORMAT or state.get("client") != self.client:
                raise ValueError("it is not this client's ledger in a format this fedtrain reads")
            counter = int(state["counter"])
            dict(state["shards"])
        except FedtrainError:
            raise FedtrainError(
                f"this client's privacy ledger {self.path} does not open with its key (edited, damaged or another "
                "client's); it cannot be trusted: restore it from a backup."
            ) from None
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise FedtrainError(f"this client's privacy ledger {self.path} is damaged ({exc}); restore it.") from None
        if anchored is not None and counter < anchored:
            raise FedtrainError(
                f"this client's privacy ledger {self.path} is older than its anchor (update {counter}, the anchor "
                f"says {anchored}): it was rolled back; restore the latest ledger."
            )
        return state

    def _digests(self, fingerprint: str, state: dict[str, Any]) -> np.ndarray:
        shard = state["shards"][fingerprint]
        if self.folder is None:
            return np.frombuffer(base64.b64decode(shard["digests"]), dtype="<u8")
        assert self.key is not None
        raw = read_encrypted(
            self.folder / f"{fingerprint[:32]}.digests",
            self.key,
            _context("digests", self.client, f"|shard={fingerprint}"),
        )
        return np.frombuffer(raw, dtype="<u8")

    def view(self, shard: ShardIdentity, run: str) -> RunView:
        """What `run` has spent on `shard`, and the shard's lifetime entries."""
        state = self._load()
        return self._view(state, shard, run)

    def _view(self, state: dict[str, Any], shard: ShardIdentity, run: str) -> RunView:
        own = state["shards"].get(shard.fingerprint, {"runs": {}})
        this_run = own["runs"].get(run, {})
        plan = RunPlan.from_dict(this_run["plan"]) if this_run.get("plan") else None
        run_entries = _entries(this_run.get("entries", []))
        lifetime, runs = [], 0
        for fingerprint, stored in state["shards"].items():
            if fingerprint != shard.fingerprint and not shard.overlaps(self._digests(fingerprint, state)):
                continue
            for run_id, item in stored["runs"].items():
                lifetime.extend(_entries(item.get("entries", [])))
                runs += int(not (fingerprint == shard.fingerprint and run_id == run) and bool(item.get("entries")))
        return RunView(shard, run, plan, run_entries, lifetime, runs)

    # ------------------------------------------------------------------ writing

    def record(self, shard: ShardIdentity, run: str, plan: RunPlan, entries: list[LedgerEntry]) -> RunView:
        """Append `entries` to `run` over `shard` (with its plan), durably, before anything is released.

        Returns:
            The view after the write.
        """
        with self._locked():
            state = self._load()
            shards = state["shards"]
            if shard.fingerprint not in shards:
                shards[shard.fingerprint] = {"records": shard.records, "first_used": _now(), "runs": {}}
                self._write_digests(shard, shards[shard.fingerprint])
            item = shards[shard.fingerprint]["runs"].setdefault(run, {"started": _now(), "entries": []})
            item["plan"] = plan.to_dict()
            item["entries"].extend(e.to_dict() for e in entries)
            state["counter"] = int(state["counter"]) + 1
            self._save(state)
            return self._view(state, shard, run)

    def _write_digests(self, shard: ShardIdentity, item: dict[str, Any]) -> None:
        raw = np.asarray(shard.digests, dtype="<u8").tobytes()
        if self.folder is None:
            item["digests"] = base64.b64encode(raw).decode()
            return
        assert self.key is not None
        write_encrypted(
            self.folder / f"{shard.fingerprint[:32]}.digests",
            raw,
            self.key,
            _context("digests", self.client, f"|shard={shard.fingerprint}"),
        )

    def _save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            self.memory[self.client] = state
            return
        assert self.key is not None
        write_encrypted(self.path, json.dumps(state).encode(), self.key, _context("store", self.client))
        if self.anchor is not None:
            write_anchor(self.anchor, self.key, self.client, int(state["counter"]))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (tasks of one node may overlap)."""
        if self.folder is None:
            yield
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.folder / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reporting

    def shards(self) -> list[StoredShard]:
        """Every shard this client has trained or released on, with its runs and lifetime entries
        (what `fedtrain ledger` shows)."""
        state = self._load()
        out = []
        for fingerprint, shard in state["shards"].items():
            identity = ShardIdentity(fingerprint, int(shard["records"]), self._digests(fingerprint, state))
            runs = [
                StoredRun(
                    run_id,
                    str(item.get("started", "")),
                    RunPlan.from_dict(item["plan"]) if item.get("plan") else None,
                    _entries(item.get("entries", [])),
                )
                for run_id, item in shard["runs"].items()
            ]
            overlaps = [
                other
                for other in state["shards"]
                if other != fingerprint and identity.overlaps(self._digests(other, state))
            ]
            view = self._view(state, identity, "")
            out.append(StoredShard(identity, str(shard.get("first_used", "")), runs, view.lifetime_entries, overlaps))
        return out


@dataclass
class StoredRun:
    run: str
    started: str
    plan: RunPlan | None
    entries: list[LedgerEntry]


@dataclass
class StoredShard:
    identity: ShardIdentity
    first_used: str
    runs: list[StoredRun]
    lifetime_entries: list[LedgerEntry]
    overlaps: list[str]  # fingerprints of other stored shards sharing records with this one


def _empty(client: str) -> dict[str, Any]:
    return {"format": FORMAT, "client": client, "counter": 0, "shards": {}}


def _entries(items: list[dict[str, Any]]) -> list[LedgerEntry]:
    try:
        return [LedgerEntry.from_dict(e) for e in items]
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise FedtrainError(f"a stored privacy ledger entry is damaged ({exc}); it cannot be trusted.") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
