"""Which Opacus grad-sample mode computes a model's per-sample gradients fastest on a device, or in the
memory a client has.

Opacus computes the same per-sample gradients in several ways ("modes"), and the fastest depends on
the device (benchmarks/RESULTS.md, benchmarks/dp_throughput.py): on the CPU PyTorch's expanded weights
("ew") beat Opacus's hooks; on CUDA hooks win. Expanded weights know fewer layers than hooks (whose
functorch fallback takes any layer), and Opacus checks nothing for them. Clipping is only as good as
the per-sample gradients it clips, so a faster mode is taken only if, on a probe batch through a copy
of the model, it gives every trainable parameter the same per-sample gradients as hooks. Hooks, the
reference, is always the last resort: `build_model` has validated the model for it, and it is what
fedtrain used before modes were chosen.

Memory: every mode but one stores a per-sample gradient for each trainable parameter, batch x
parameters values; for a large model that does not fit. Opacus's ghost clipping ("ghost", fast
gradient clipping: per-sample gradient norms from activations and output gradients, then a second
backward pass on the clipped loss) stores none. fedtrain takes it when the estimate of per-sample
gradient memory passes a cap (`grad_sample_memory_mib`; unset: a quarter of the device's memory), or
when asked, and only if on a probe batch it gives the clipped gradient sum hooks give.

Mixed precision (`precision = "bf16"`): the forward pass runs under torch.autocast; per-sample
gradients are promoted to float32 before they are clipped (clip_grad_samples_in_float32), so clipping
bounds each sample's contribution as in float32. Expanded weights cannot run under autocast, and ghost
clipping is not combined with it: its clipping factors come from norms computed in bfloat16, which
could let a clipped gradient exceed max_grad_norm by a fraction of a percent.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from fedtrain.errors import FedtrainError

log = logging.getLogger("fedtrain")

REFERENCE_MODE = "hooks"
GHOST = "ghost"
MODES = ("auto", "hooks", "ew", "functorch", GHOST)  # what `grad_sample_mode` may ask for
PRECISIONS = ("fp32", "bf16")
# Fastest first; hooks ends every list (measured in benchmarks/RESULTS.md, issue #6).
PREFERENCES: dict[str, tuple[str, ...]] = {"cpu": ("ew", REFERENCE_MODE), "cuda": (REFERENCE_MODE,)}
PROBE_BATCH = 3  # more than one sample, so a mode that mixes samples up shows
PROBE_RTOL, PROBE_ATOL = 1e-3, 1e-6  # float error between two correct modes is far below this


def per_sample_gradient_bytes(model: nn.Module, batch: int) -> int:
    """What storing one batch's per-sample gradients takes: batch x every trainable parameter."""
    return batch * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def default_memory_cap(device: torch.device) -> int:
    """A quarter of the device's memory (the rest: the model, its activations, the optimizer, the data)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        return 2 * 2**30


def choose_grad_sample_mode(
    model: nn.Module,
    input_shape: list[int],
    device: torch.device,
    *,
    requested: str = "auto",
    batch: int | None = None,
    memory_cap_bytes: int | None = None,
    precision: str = "fp32",
) -> str:
    """The Opacus grad-sample mode for training `model` on `device`.

    Args:
        model: the model (copies of it are probed; it is not touched).
        input_shape: one sample's shape (the probe batch is random from a fixed seed: nothing about the
            data is used).
        device: where it trains.
        requested: "auto", or a mode to use (checked against hooks on the probe like any other).
        batch: the physical batch (for the memory estimate); None: no estimate, no ghost unless asked.
        memory_cap_bytes: the most per-sample gradients may take; None: a quarter of the device's memory.
        precision: "fp32", or "bf16" (autocast).

    Returns:
        "ghost" when requested, or automatically when per-sample gradients would pass the cap; else the
        first mode of the device's preference list that matches hooks on the probe.

    Raises:
        FedtrainError: a requested mode that does not give the model hooks' clipped gradients, or
            ghost clipping with bf16, asked for or needed.
    """
    if requested not in MODES:
        raise FedtrainError(f"grad_sample_mode must be one of {', '.join(MODES)}, not {requested!r}.")
    low_precision = precision != "fp32"
    if requested == "auto" and batch is not None:
        need = per_sample_gradient_bytes(model, batch)
        cap = memory_cap_bytes if memory_cap_bytes is not None else default_memory_cap(device)
        if need > cap:
            if low_precision:
                raise FedtrainError(
                    f"per-sample gradients of this model would take {need / 2**20:.0f} MiB at batch {batch}, above "
                    f"the cap of {cap / 2**20:.0f} MiB; ghost clipping would fit, but fedtrain does not combine it "
                    f"with precision = {precision} (its half-precision norms could let a clipped gradient exceed "
                    "max_grad_norm): use precision = fp32, a smaller max_physical_batch_size, or a larger "
                    "grad_sample_memory_mib."
                )
            if matches_reference(model, GHOST, input_shape, device):
                log.info("per-sample gradients would take %.1f MiB (cap %.1f MiB): ghost clipping",
                         need / 2**20, cap / 2**20)  # fmt: skip
                return GHOST
            log.warning("per-sample gradients would take %.1f MiB, above the cap, and ghost clipping does not "
                        "match hooks on this model: they are stored anyway", need / 2**20)  # fmt: skip
    if requested != "auto":
        if requested == GHOST and low_precision:
            raise FedtrainError(
                f"grad_sample_mode = ghost cannot be used with precision = {precision}: its half-precision norms "
                "could let a clipped gradient exceed max_grad_norm; use precision = fp32 or another mode."
            )
        if requested == REFERENCE_MODE or matches_reference(model, requested, input_shape, device, precision):
            return requested
        raise FedtrainError(
            f"grad_sample_mode = {requested} does not give this model the clipped per-sample gradients Opacus's "
            "hooks give (checked on a probe batch); use grad_sample_mode = auto or hooks."
        )
    for mode in PREFERENCES.get(device.type, (REFERENCE_MODE,)):
        if mode == REFERENCE_MODE or matches_reference(model, mode, input_shape, device, precision):
            return mode
    return REFERENCE_MODE


def matches_reference(
    model: nn.Module, mode: str, input_shape: list[int], device: torch.device, precision: str = "fp32"
) -> bool:
    """Whether Opacus's `mode` gives every trainable parameter of `model` the per-sample gradients that
    hooks give, on one probe batch (copies of the model are probed: `model` itself is not touched).
    Ghost clipping computes no per-sample gradients: it must give the clipped sum hooks give, with a
    clipping bound that clips about half the probe's samples."""
    probe = torch.rand(PROBE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    reference = _grad_samples(model, REFERENCE_MODE, probe, precision)
    if reference is None:
        return False
    if mode == GHOST:
        norms = torch.stack([g.reshape(len(probe), -1).norm(dim=1) for g in reference]).norm(dim=0)
        clip = float(norms.median())
        expected = [torch.einsum("i,i...->...", (clip / (norms + 1e-6)).clamp(max=1.0), g) for g in reference]
        got = _clipped_sum(model, GHOST, probe, clip)
        return got is not None and _close(got, expected, mode)
    candidate = _grad_samples(model, mode, probe, precision)
    return candidate is not None and _close(candidate, reference, mode)


def _close(candidate: list[torch.Tensor], reference: list[torch.Tensor], mode: str) -> bool:
    for got, expected in zip(candidate, reference, strict=True):
        if got.shape != expected.shape or (got - expected).norm() > PROBE_RTOL * expected.norm() + PROBE_ATOL:
            log.debug("grad-sample mode %s disagrees with %s on this model", mode, REFERENCE_MODE)
            return False
    return True


class ProbeLoss(nn.Module):
    """A per-sample loss that depends on every output (their sum), with the `reduction` Opacus sets."""

    reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = outputs.reshape(len(outputs), -1).sum(dim=1)
        return per_sample if self.reduction == "none" else per_sample.mean()


@contextlib.contextmanager
def _probing(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # the same dropout masks, if any, in every mode; the caller's RNG is restored
        yield


def _clipped_sum(model: nn.Module, mode: str, probe: torch.Tensor, clip: float) -> list[torch.Tensor] | None:
    """The noiseless clipped gradient sum `mode` gives a copy of `model` on the probe (clipping at `clip`)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    clone = copy.deepcopy(model).to(probe.device).train()
    params = [p for p in clone.parameters() if p.requires_grad]
    try:
        with _probing(probe.device):
            loader = DataLoader(TensorDataset(probe, torch.zeros(len(probe))), batch_size=len(probe))
            made = PrivacyEngine(accountant="rdp").make_private(
                module=clone, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader, noise_multiplier=0.0,
                max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode, criterion=ProbeLoss(),
            )  # fmt: skip
            private, optimizer, criterion = made[0], made[1], made[2]
            optimizer.zero_grad(set_to_none=True)
            criterion(private(probe), torch.zeros(len(probe))).backward()
            optimizer.pre_step()  # clip, sum, noise 0, scale by 1 / expected batch
    except Exception as exc:  # any failure means "not this mode"
        log.debug("grad-sample mode %s cannot train this model: %s: %s", mode, type(exc).__name__, exc)
        return None
    return [p.grad.detach() * len(probe) if p.grad is not None else torch.zeros_like(p) for p in params]


def _grad_samples(
    model: nn.Module, mode: str, probe: torch.Tensor, precision: str = "fp32"
) -> list[torch.Tensor] | None:
    """Per-sample gradients of each trainable parameter of a copy of `model`, or None if `mode` fails."""
    from opacus.grad_sample.utils import prepare_module

    clone = copy.deepcopy(model).to(probe.device).train()
    try:
        # Wrapped as PrivacyEngine.make_private wraps it (batch first, mean loss).
        wrapped = prepare_module(clone, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        with _probing(probe.device):
            with autocast(probe.device, precision):
                # the mean loss, as make_private is told: hooks then give each sample its own gradient
                out = ProbeLoss()(wrapped(probe), probe)
            out.backward()
    except Exception as exc:  # any failure means "not this mode": the next one is tried
        log.debug("grad-sample mode %s cannot train this model: %s: %s", mode, type(exc).__name__, exc)
        return None
    grads = []
    for p in clone.parameters():
        if p.requires_grad:
            grad = getattr(p, "grad_sample", None)
            if not isinstance(grad, torch.Tensor) or grad.shape != (len(probe), *p.shape):
                return None
            grads.append(grad.detach().float())
    return grads


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in bfloat16 for precision "bf16"; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise FedtrainError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def clip_grad_samples_in_float32(model: nn.Module) -> None:
    """Per-sample gradients computed in half precision, promoted to each parameter's dtype before Opacus
    clips them: their norms, clipping factors and sum are then float32's, so each sample's clipped
    contribution is bounded by max_grad_norm as in float32 training."""
    for p in model.parameters():
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != p.dtype:
            p.grad_sample = sample.to(p.dtype)  # type: ignore[attr-defined]


def set_empty_grad_samples(model: nn.Module) -> None:
    """Give each trainable parameter the per-sample gradients of an empty batch: none.

    Expanded weights refuse a batch of 0 samples, which Poisson sampling sometimes draws; these empty
    tensors are exactly what hooks compute for it, so Opacus's optimizer then clips nothing, adds pure
    noise and the accountant counts the step, as in every mode. Ghost clipping's optimizer sums the
    gradients of its second backward pass instead: for an empty batch, zero.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            p.grad = torch.zeros_like(p)


def memory_cap_bytes(mib: float | None) -> int | None:
    """A cap in MiB as bytes (None stays None: the device's default)."""
    return None if mib is None else int(math.ceil(mib * 2**20))
