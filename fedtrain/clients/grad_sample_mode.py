"""Which Opacus grad-sample mode computes a model's per-sample gradients fastest on a device.

Opacus computes the same per-sample gradients in several ways ("modes"), and the fastest depends on
the device (benchmarks/RESULTS.md, benchmarks/dp_throughput.py): on the CPU PyTorch's expanded weights
("ew") beat Opacus's hooks; on CUDA hooks win. Expanded weights know fewer layers than hooks (whose
functorch fallback takes any layer), and Opacus checks nothing for them, so a mode is taken only after
a forward and backward pass of a copy of the model has given every trainable parameter its per-sample
gradient. Hooks, the reference mode, is always the last resort: `build_model` has validated the model
for it, and it is what fedtrain used before modes were chosen.
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
PROBE_BATCH = 2  # more than one sample, so a mode that mixes samples up shows in the shapes


def choose_grad_sample_mode(model: nn.Module, input_shape: list[int], device: torch.device) -> str:
    """The first mode in the device's preference list that handles every trainable layer of `model`.

    Only the input's shape is used (the probe feeds zeros), so the choice reveals nothing about the data.
    """
    for mode in PREFERENCES.get(device.type, (REFERENCE_MODE,)):
        if mode == REFERENCE_MODE or handles_every_layer(model, mode, input_shape, device):
            return mode
    return REFERENCE_MODE


def handles_every_layer(model: nn.Module, mode: str, input_shape: list[int], device: torch.device) -> bool:
    """Whether Opacus's `mode` gives each trainable parameter of a copy of `model` per-sample gradients."""
    from opacus.grad_sample.utils import prepare_module

    probe = copy.deepcopy(model).to(device).train()  # the caller's model keeps no hooks, attributes or grads
    try:
        # Wrapped as PrivacyEngine.make_private wraps it (batch first, mean loss).
        wrapped = prepare_module(probe, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped(torch.zeros(PROBE_BATCH, *input_shape, device=device)).sum().backward()
    except Exception as exc:  # any failure means "not this mode": the next one is tried
        log.debug("grad-sample mode %s cannot train this model: %s: %s", mode, type(exc).__name__, exc)
        return False
    return all(
        isinstance(getattr(p, "grad_sample", None), torch.Tensor) and p.grad_sample.shape == (PROBE_BATCH, *p.shape)
        for p in probe.parameters()
        if p.requires_grad
    )


def set_empty_grad_samples(model: nn.Module) -> None:
    """Give each trainable parameter the per-sample gradients of an empty batch: none.

    Expanded weights refuse a batch of 0 samples, which Poisson sampling sometimes draws; these empty
    tensors are exactly what hooks compute for it, so Opacus's optimizer then clips nothing, adds pure
    noise and the accountant counts the step, as in every mode.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
