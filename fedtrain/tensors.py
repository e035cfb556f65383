"""Model weights <-> bytes without pickle: a .npz archive read with allow_pickle=False."""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from fedtrain.errors import FedtrainError

ORDER, META = "__order__", "__meta__"


def state_dict_to_bytes(state: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    """Serialise tensors (order and dtypes kept) plus optional JSON metadata; no code, no pickle."""
    buffer = io.BytesIO()
    arrays = {name: tensor.detach().cpu().numpy() for name, tensor in state.items()}
    extra = {META: np.array(json.dumps(meta or {}), dtype=np.str_)}
    members: dict[str, Any] = {ORDER: np.array(list(arrays), dtype=np.str_), **extra, **arrays}
    np.savez(buffer, **members)
    return buffer.getvalue()


def bytes_to_state_dict(data: bytes, what: str = "the weights") -> tuple[OrderedDict[str, torch.Tensor], dict]:
    """Inverse of `state_dict_to_bytes`: (state_dict, metadata); malformed bytes give a FedtrainError."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            order = [str(name) for name in archive[ORDER]]
            meta = json.loads(str(archive[META])) if META in archive.files else {}
            state = OrderedDict((name, torch.from_numpy(np.array(archive[name]))) for name in order)
    except Exception as exc:  # noqa: BLE001 - zipfile alone raises a dozen kinds on crafted archives
        raise FedtrainError(f"{what} are not a valid fedtrain weights archive ({exc}).") from None
    if not isinstance(meta, dict):
        raise FedtrainError(f"{what} carry malformed metadata.")
    return state, meta
