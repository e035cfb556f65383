"""Choosing the torch device: `auto` takes CUDA when present; asking for a missing one is an error."""

from __future__ import annotations

import functools

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


@functools.cache
def _accelerators() -> bool:
    """Whether this process could use any device but the CPU (torch's build and this machine)."""
    for name in ("cuda", "xpu", "mtia"):  # the modules torch.manual_seed seeds (xpu, mtia: torch >= 2.3, 2.4)
        module = getattr(torch, name, None)
        if module is not None and module.is_available():
            return True
    return torch.backends.mps.is_available() or hasattr(torch, torch._C._get_privateuse1_backend_name())


def manual_seed(seed: int) -> None:
    """`torch.manual_seed(seed)`. Where no accelerator can exist, the CPU generator is the only one it
    seeds; torch.manual_seed would also queue a lazy seed call for each accelerator module (with a stack
    trace each, milliseconds deep inside a simulated client) for devices this process cannot start."""
    if _accelerators():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))
