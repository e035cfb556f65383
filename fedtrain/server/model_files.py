"""Encrypted model files in a run directory: the final model and the latest checkpoint.

Each is a sealed envelope (AES-256-GCM) whose associated data names the file's kind and the run,
so a checkpoint cannot pass for a final model, nor one run's model for another's.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from fedtrain.errors import FedtrainError
from fedtrain.security.files import file_context, read_encrypted, write_encrypted
from fedtrain.tensors import bytes_to_state_dict, state_dict_to_bytes

MODEL_FILE = "model.ftenc"
CHECKPOINT_FILE = "checkpoint.ftenc"
RUN_FILE = "run.json"


def save_model(path: Path, state: dict[str, torch.Tensor], key: bytes, run_id: str, kind: str, meta: dict) -> Path:
    """Encrypt and atomically write weights plus metadata (round, config fingerprint...)."""
    return write_encrypted(path, state_dict_to_bytes(state, meta), key, file_context(kind, run_id))


def load_model(path: Path, key: bytes, run_id: str, kind: str) -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """Open an encrypted model file of this run; wrong key or tampering is a clear error."""
    plaintext = read_encrypted(path, key, file_context(kind, run_id))
    return bytes_to_state_dict(plaintext, what=f"the weights in {path}")


def read_run_info(run_dir: Path) -> dict:
    """The run's public metadata (run id, key id); needed to open its encrypted files."""
    path = Path(run_dir) / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtrainError(f"{run_dir} is not a fedtrain run directory (no {RUN_FILE}); check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedtrainError(f"{path} is unreadable ({exc}); the run directory is damaged.") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise FedtrainError(f"{path} has no run_id; the run directory is damaged.")
    return info
