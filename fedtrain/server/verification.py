"""`fedtrain verify` and `fedtrain export`'s check: is every file of a run as fedtrain wrote it?

The plain files (metrics, privacy report, plot) are checked against the run's integrity record
(security/run_integrity.py); the encrypted model and checkpoint authenticate themselves (AES-GCM).
Both need the run's model key.
"""

from __future__ import annotations

from pathlib import Path

from fedtrain.errors import FedtrainError
from fedtrain.security.files import file_context, read_encrypted
from fedtrain.security.keys import ModelKey
from fedtrain.security.run_integrity import RunIntegrity
from fedtrain.server.history import PROTECTED
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, read_run_info

ENCRYPTED = {MODEL_FILE: "model", CHECKPOINT_FILE: "checkpoint"}


def run_integrity(run_dir: Path, model_key: ModelKey) -> RunIntegrity:
    """The integrity record of the run in `run_dir`, opened with `model_key`.

    Raises:
        FedtrainError: not a run directory, or the key is not the run's.
    """
    info = read_run_info(run_dir)
    if info.get("key_id") not in (None, model_key.key_id):
        raise FedtrainError(
            f"the run in {run_dir} is sealed with key {info['key_id']}, not with the key given "
            f"({model_key.key_id}); give the run's model key (--key-file)."
        )
    return RunIntegrity(run_dir, model_key.key, info["run_id"])


def verify_run(run_dir: Path, model_key: ModelKey) -> dict[str, str]:
    """Every file of the run with its state: "ok", or what is wrong with it.

    Args:
        run_dir: a run directory written by fedtrain.
        model_key: the run's model key.

    Returns:
        file name -> "ok", "edited", "deleted", "not recorded", or why an encrypted file does not open.

    Raises:
        FedtrainError: not a run directory, the wrong key, or an integrity record that is missing
            (while the files it covers exist), damaged or edited.
    """
    integrity = run_integrity(run_dir, model_key)
    states = integrity.check(PROTECTED)
    for name, kind in ENCRYPTED.items():
        path = Path(run_dir) / name
        if not path.exists():
            continue
        try:
            read_encrypted(path, model_key.key, file_context(kind, integrity.run_id))
            states[name] = "ok"
        except FedtrainError as exc:
            states[name] = str(exc).rstrip(".")
    return dict(sorted(states.items()))


def require_intact_reports(run_dir: Path, model_key: ModelKey) -> None:
    """Raise one sentence when the run's metrics, privacy report or plot were edited (for export).

    Raises:
        FedtrainError: naming each file that is not as fedtrain wrote it.
    """
    run_integrity(run_dir, model_key).require_intact(PROTECTED)
