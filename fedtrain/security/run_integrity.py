"""Integrity of a run's plain files (metrics, privacy report, plot) under the run's model key.

`integrity.json` lists the SHA-256 of each protected file and carries an HMAC-SHA256 over that
list, the run id and the key id, keyed with a key derived (HKDF) from the model key for this use
only. The bytes are covered as written, whatever they hold, so the files' content can change
without touching this module. Whoever edits a file without the model key cannot make the list
agree again.

A crash must never make an honest run look tampered with, so every update is three atomic steps:

    1. integrity.json allows, per file to be written, its current version and the next one,
    2. the files are written (each atomically),
    3. integrity.json allows only the next versions.

A crash between any two steps leaves every file at a version the list allows. A current version
that does not match the list (edited) is never carried into step 1, so writing over an edited file
cannot bless it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_bytes, atomic_write_text
from fedtrain.security.envelope import key_id

MANIFEST = "integrity.json"
FORMAT = 1
HKDF_INFO = b"fedtrain|run-integrity|v1"  # this derived key authenticates run files and nothing else
ABSENT = "absent"  # a version of a file that did not exist yet (a crash before its first write)

log = logging.getLogger("fedtrain")


def sha256(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize().hex()


class RunIntegrity:
    """The integrity record of one run directory, under one model key."""

    def __init__(self, run_dir: Path, model_key: bytes, run_id: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.key_id = key_id(model_key).hex()
        self._mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(model_key)

    # ------------------------------------------------------------------ writing

    def write(self, files: dict[str, bytes]) -> None:
        """Write `files` (name -> bytes) into the run directory and record them, crash-safely.

        Args:
            files: the plain files to write, by name, with their complete content.
        """
        try:
            recorded = self.recorded() or {}
        except FedtrainError as exc:  # an edited record: start over, so nothing edited is carried on
            log.warning("%s; files written from now on are recorded anew", exc)
            recorded = {}
        new = {name: sha256(data) for name, data in files.items()}
        staged = dict(recorded)
        for name, digest in new.items():
            current = self._digest_on_disk(name) or ABSENT
            staged[name] = sorted({digest, *([current] if current in recorded.get(name, [ABSENT]) else [])})
        self._save(staged)
        for name, data in files.items():
            atomic_write_bytes(self.run_dir / name, data)
        self._save({**staged, **{name: [digest] for name, digest in new.items()}})

    def reseal(self, files: dict[str, list[str]]) -> None:
        """Record `files` (name -> allowed SHA-256 digests) under this key (key rotation)."""
        self._save(files)

    def _save(self, files: dict[str, list[str]]) -> None:
        body = self._body(files)
        record = {**body, "mac": self._mac(body)}
        atomic_write_text(self.run_dir / MANIFEST, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _body(self, files: dict[str, list[str]]) -> dict:
        return {"format": FORMAT, "run_id": self.run_id, "key_id": self.key_id, "files": dict(sorted(files.items()))}

    def _mac(self, body: dict) -> str:
        signer = hmac.HMAC(self._mac_key, hashes.SHA256())
        signer.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        return signer.finalize().hex()

    def _digest_on_disk(self, name: str) -> str | None:
        try:
            return sha256((self.run_dir / name).read_bytes())
        except OSError:
            return None

    # ------------------------------------------------------------------ reading

    def recorded(self) -> dict[str, list[str]] | None:
        """The authenticated record (name -> allowed SHA-256 digests), or None if the run has none.

        Raises:
            FedtrainError: the record is damaged, edited, of another run or under another key.
        """
        path = self.run_dir / MANIFEST
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise FedtrainError(f"{path} is damaged; the run's files cannot be verified.")
        if record.get("key_id") != self.key_id:
            raise FedtrainError(
                f"{path} was sealed with key {record.get('key_id')}, not with the key given ({self.key_id}); "
                "give the run's model key."
            )
        body = {key: record.get(key) for key in ("format", "run_id", "key_id", "files")}
        verifier = hmac.HMAC(self._mac_key, hashes.SHA256())
        verifier.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        try:
            verifier.verify(bytes.fromhex(str(record.get("mac", ""))))
        except (ValueError, InvalidSignature):
            raise FedtrainError(
                f"{path} was edited after fedtrain wrote it; the run's files cannot be trusted."
            ) from None
        if record["run_id"] != self.run_id:
            raise FedtrainError(f"{path} belongs to run {record['run_id']}, not to this run ({self.run_id}).")
        return {str(name): [str(d) for d in digests] for name, digests in record["files"].items()}

    def check(self, protected: Iterable[str]) -> dict[str, str]:
        """Each recorded or protected file with its state: "ok", "edited", "deleted" or "not recorded".

        Args:
            protected: names the run's writer always records (a present one that is not recorded
                was added or replaced behind fedtrain's back).

        Raises:
            FedtrainError: the record itself is missing (while protected files exist), damaged or edited.
        """
        present = [name for name in protected if (self.run_dir / name).exists()]
        recorded = self.recorded()
        if recorded is None:
            if present:
                raise FedtrainError(
                    f"{self.run_dir} has no {MANIFEST}, so {', '.join(present)} cannot be verified "
                    "(it was deleted, or the run was written by a fedtrain without run integrity records)."
                )
            return {}
        states = {}
        for name in sorted({*recorded, *present}):
            digest = self._digest_on_disk(name)
            if name not in recorded:
                states[name] = "not recorded"
            elif digest is None:
                states[name] = "ok" if ABSENT in recorded[name] else "deleted"
            else:
                states[name] = "ok" if digest in recorded[name] else "edited"
        return states

    def require_intact(self, protected: Iterable[str]) -> dict[str, str]:
        """`check`, raising one sentence when any file is not as fedtrain wrote it.

        Returns:
            The states (all "ok").

        Raises:
            FedtrainError: naming the files that were edited, deleted or not recorded.
        """
        states = self.check(protected)
        bad = {name: state for name, state in states.items() if state != "ok"}
        if bad:
            listed = ", ".join(f"{name} ({state})" for name, state in bad.items())
            raise FedtrainError(
                f"files of {self.run_dir} are not as fedtrain wrote them: {listed}; do not trust this run's "
                "reports (the encrypted model and checkpoint are authenticated separately)."
            )
        return states
