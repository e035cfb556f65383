"""Re-encrypt a run's model files under a new model key (key rotation).

Every encrypted file of the run (final model, checkpoint) and its integrity record (metrics,
privacy report, plot) is opened with the old key before anything is written, so a wrong key or a
tampered file changes nothing. run.json first records the rotation in progress, then each file is
replaced atomically and the integrity record re-sealed, then run.json names the new key. If the
process dies half-way, running the same rotation again finishes it: files already under the new
key are recognised and left alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text
from fedtrain.security.files import file_context, read_encrypted, write_encrypted
from fedtrain.security.keys import ModelKey
from fedtrain.security.run_integrity import RunIntegrity
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, RUN_FILE, read_run_info

ENCRYPTED = {MODEL_FILE: "model", CHECKPOINT_FILE: "checkpoint"}


def rotate_run_key(run_dir: Path, old: ModelKey, new: ModelKey) -> list[Path]:
    """Seal every encrypted file of the run in `run_dir` with `new`; returns the files rewritten."""
    info = read_run_info(run_dir)
    run_id, current = info["run_id"], info.get("key_id")
    resuming = info.get("rotating_to") == new.key_id
    if current != old.key_id:
        raise FedtrainError(
            f"the run in {run_dir} is encrypted with key {current}, and the key given as the old one is "
            f"{old.key_id}; give the run's current key."
        )
    if new.key_id == old.key_id:
        raise FedtrainError("the new key is the old key; generate a new one to rotate to.")
    plaintexts: dict[Path, bytes] = {}
    for name, kind in ENCRYPTED.items():
        path = run_dir / name
        if not path.exists():
            continue
        context = file_context(kind, run_id)
        try:
            plaintexts[path] = read_encrypted(path, old.key, context)
        except FedtrainError:
            if not resuming:
                raise
            read_encrypted(path, new.key, context)  # already rotated by the interrupted attempt
    recorded = _integrity_record(run_dir, run_id, old, new, resuming)
    _write_info(run_dir, {**info, "rotating_to": new.key_id})
    for path, plaintext in plaintexts.items():
        write_encrypted(path, plaintext, new.key, file_context(ENCRYPTED[path.name], run_id))
    if recorded is not None:
        RunIntegrity(run_dir, new.key, run_id).reseal(recorded)
    _write_info(run_dir, {k: v for k, v in {**info, "key_id": new.key_id}.items() if k != "rotating_to"})
    _point_config_at(run_dir, new)
    return list(plaintexts)


def _integrity_record(
    run_dir: Path, run_id: str, old: ModelKey, new: ModelKey, resuming: bool
) -> dict[str, list[str]] | None:
    """The run's integrity record, authenticated with the old key (or, after an interrupted
    rotation, the new one): it is re-sealed under the new key, never carried over unchecked."""
    try:
        return RunIntegrity(run_dir, old.key, run_id).recorded()
    except FedtrainError:
        if not resuming:
            raise
        return RunIntegrity(run_dir, new.key, run_id).recorded()


def _write_info(run_dir: Path, info: dict) -> None:
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2) + "\n")


def _point_config_at(run_dir: Path, new: ModelKey) -> None:
    """The run's config.toml names its key file (for export and resume): name the new one."""
    path = run_dir / "config.toml"
    if not path.exists():
        return
    text = re.sub(r"(?m)^key_file = .*\n?", "", path.read_text(encoding="utf-8"))
    if new.path is not None:
        text = text.rstrip("\n") + f"\nkey_file = {json.dumps(str(new.path))}\n"
    atomic_write_text(path, text)
