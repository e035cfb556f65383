"""Choosing the torch device: `auto` takes CUDA when present; asking for a missing one is an error."""

from __future__ import annotations

import torch

from fedtrain.errors import FedtrainError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FedtrainError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FedtrainError(f"device {name} was asked for but CUDA is not available here; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FedtrainError(f"device {name} does not exist: this machine has {torch.cuda.device_count()} GPUs.")
    elif device.type != "cpu":
        raise FedtrainError(f"device {name} is not supported; use auto, cpu, cuda or cuda:N.")
    return device
