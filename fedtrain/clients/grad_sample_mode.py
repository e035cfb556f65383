"""Which Opacus grad-sample mode computes a model's per-sample gradients fastest on a device.

Opacus computes the same per-sample gradients in several ways ("modes"), and the fastest depends on
the device (benchmarks/RESULTS.md, benchmarks/dp_throughput.py): on the CPU PyTorch's expanded weights
("ew") beat Opacus's hooks; on CUDA hooks win. Expanded weights know fewer layers than hooks (whose
functorch fallback takes any layer), and Opacus checks nothing for them. Clipping is only as good as
the per-sample gradients it clips, so a faster mode is taken only if, on a probe batch through a copy
of the model, it gives every trainable parameter the same per-sample gradients as hooks. Hooks, the
reference, is always the last resort: `build_model` has validated the model for it, and it is what
fedtrain used before modes were chosen.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

log = logging.getLogger("fedtrain")

REFERENCE_MODE = "hooks"
# Fastest first; hooks ends every list (measured in benchmarks/RESULTS.md, issue #6).
PREFERENCES: dict[str, tuple[str, ...]] = {"cpu": ("ew", REFERENCE_MODE), "cuda": (REFERENCE_MODE,)}
PROBE_BATCH = 3  # more than one sample, so a mode that mixes samples up shows
PROBE_RTOL, PROBE_ATOL = 1e-3, 1e-6  # float error between two correct modes is far below this


def choose_grad_sample_mode(model: nn.Module, input_shape: list[int], device: torch.device) -> str:
    """The first mode in the device's preference list that gives `model` the reference's per-sample gradients.

    Only the input's shape is used (the probe batch is random, from a fixed seed), so the choice reveals
    nothing about the data.
    """
    for mode in PREFERENCES.get(device.type, (REFERENCE_MODE,)):
        if mode == REFERENCE_MODE or matches_reference(model, mode, input_shape, device):
            return mode
    return REFERENCE_MODE


def matches_reference(model: nn.Module, mode: str, input_shape: list[int], device: torch.device) -> bool:
    """Whether Opacus's `mode` gives every trainable parameter of `model` the per-sample gradients that
    hooks give, on one probe batch (copies of the model are probed: `model` itself is not touched)."""
    probe = torch.rand(PROBE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    candidate = _grad_samples(model, mode, probe)
    if candidate is None:
        return False
    reference = _grad_samples(model, REFERENCE_MODE, probe)
    if reference is None:
        return False
    for got, expected in zip(candidate, reference, strict=True):
        if (got - expected).norm() > PROBE_RTOL * expected.norm() + PROBE_ATOL:
            log.debug("grad-sample mode %s disagrees with %s on this model", mode, REFERENCE_MODE)
            return False
    return True


def _grad_samples(model: nn.Module, mode: str, probe: torch.Tensor) -> list[torch.Tensor] | None:
    """Per-sample gradients of each trainable parameter of a copy of `model`, or None if `mode` fails."""
    from opacus.grad_sample.utils import prepare_module

    clone = copy.deepcopy(model).to(probe.device).train()
    try:
        # Wrapped as PrivacyEngine.make_private wraps it (batch first, mean loss).
        wrapped = prepare_module(clone, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        devices = [probe.device] if probe.device.type == "cuda" else []
        with warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
            warnings.simplefilter("ignore")
            torch.manual_seed(0)  # the same dropout masks, if any, in every mode; the caller's RNG is restored
            wrapped(probe).sum().backward()
    except Exception as exc:  # any failure means "not this mode": the next one is tried
        log.debug("grad-sample mode %s cannot train this model: %s: %s", mode, type(exc).__name__, exc)
        return None
    grads = []
    for p in clone.parameters():
        if p.requires_grad:
            grad = getattr(p, "grad_sample", None)
            if not isinstance(grad, torch.Tensor) or grad.shape != (len(probe), *p.shape):
                return None
            grads.append(grad.detach())
    return grads


def set_empty_grad_samples(model: nn.Module) -> None:
    """Give each trainable parameter the per-sample gradients of an empty batch: none.

    Expanded weights refuse a batch of 0 samples, which Poisson sampling sometimes draws; these empty
    tensors are exactly what hooks compute for it, so Opacus's optimizer then clips nothing, adds pure
    noise and the accountant counts the step, as in every mode.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
