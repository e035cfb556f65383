"""The DP preflight: what would silently break DP-SGD's guarantee is refused before the first step.

An accounted epsilon holds only for the mechanism the accountant analyses: each example joins each
step independently with probability q (Poisson sampling, at the rate the ledger records), each
example's own gradient is clipped, Gaussian noise of std sigma * C is added, sigma > 0. Each way a
training setup can differ from that without any error is one check here, with one sentence:

- the data loader is not Poisson (fixed-size batches: the analysis of sampling does not apply);
- its sample rate is not the one the ledger records, or not 1 / ceil(N / B) for the split it reads;
- the optimizer's noise is not the ledger's, or is 0 while the run is reported as private;
- a layer mixes the samples of a batch (BatchNorm, a batch-mean layer): one example's output, and so
  every other example's gradient, depends on it, and clipping no longer bounds its influence;
- a trainable parameter gets no per-sample gradient (Opacus cannot clip what it cannot see);
- the per-sample gradients Opacus clips are not each example's own gradient: a constant factor off
  (the loss's reduction is not the one the noise is scaled for) or mixed with the others' (a loss
  that couples examples).

The checks look at the objects the training runs with (the private model, optimizer and loader Opacus
made) on two of the client's own examples; nothing leaves the client, and the model, the optimizer
and the accountant are left as they were. `fedtrain audit` measures what the checks cannot see.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from fedtrain.errors import FedtrainError
from fedtrain.privacy.ledger import LedgerEntry

if TYPE_CHECKING:
    from fedtrain.data import Dataset

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RTOL, ATOL = 1e-3, 1e-6  # float error between two correct gradient computations is far below this


class PreflightRefusal(FedtrainError):
    """A training setup that would break the DP guarantee without any error; the text is one sentence."""


@dataclass(frozen=True)
class PrivateSetup:
    """What one round of DP-SGD runs with, as Opacus's `make_private` returned it.

    Args:
        model: the private model (Opacus's GradSampleModule around the model).
        optimizer: Opacus's DPOptimizer.
        loader: the data loader the steps draw their batches from.
        criterion: the loss of a batch, as the training steps compute it.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: Criterion


def check(setup: PrivateSetup, planned: LedgerEntry, num_samples: int, batch_size: int,
          probe: tuple[torch.Tensor, torch.Tensor], gradients: bool = True) -> None:  # fmt: skip
    """Refuse `setup` if it would break the guarantee the ledger is about to record.

    Args:
        setup: the private model, optimizer, loader and criterion of the round.
        planned: the ledger entry the round will record (noise multiplier, sample rate).
        num_samples: examples in the training split the loader reads.
        batch_size: the expected batch size the sample rate comes from.
        probe: two examples (features, targets) of the training split, on the training device.
        gradients: check the per-sample gradients too (False for Opacus's ghost clipping, which keeps none).

    Raises:
        PreflightRefusal: one sentence naming the first problem found.
    """
    reason = refusal(setup, planned, num_samples, batch_size, probe, gradients)
    if reason is not None:
        raise PreflightRefusal(reason)


def refusal(setup: PrivateSetup, planned: LedgerEntry, num_samples: int, batch_size: int,
            probe: tuple[torch.Tensor, torch.Tensor], gradients: bool = True) -> str | None:  # fmt: skip
    """The first reason to refuse `setup` (see `check`), or None."""
    return (
        loader_refusal(setup.loader, planned, num_samples, batch_size)
        or noise_refusal(setup.optimizer, planned)
        or mixing_refusal(setup.model, probe[0])
        or (gradient_refusal(setup, probe) if gradients else None)
    )


# ---------------------------------------------------------------- sampling and noise


def loader_refusal(loader: DataLoader, planned: LedgerEntry, num_samples: int, batch_size: int) -> str | None:
    """Poisson sampling at the rate the ledger records, which is 1 / ceil(N / B) for N examples."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = loader.batch_sampler
    if isinstance(sampler, BatchSampler) or (sampler is None and loader.batch_size is not None):
        size = sampler.batch_size if isinstance(sampler, BatchSampler) else loader.batch_size
        return (
            f"the data loader draws fixed-size batches of {size} examples, not Poisson samples; the accountant's "
            "epsilon assumes each example joins each step independently, so it would not hold"
        )
    if not isinstance(sampler, UniformWithReplacementSampler):
        return (
            f"the data loader's batches come from {type(sampler).__name__}, not Poisson sampling; the accountant's "
            "epsilon assumes each example joins each step independently, so it would not hold"
        )
    expected = 1.0 / max(1, math.ceil(num_samples / batch_size))
    if sampler.num_samples != num_samples:
        return (
            f"the data loader samples from {sampler.num_samples} examples but the training split holds "
            f"{num_samples}; the sample rate the ledger records would be wrong"
        )
    if not (math.isclose(sampler.sample_rate, expected, rel_tol=1e-9)
            and math.isclose(planned.sample_rate, expected, rel_tol=1e-9)):  # fmt: skip
        return (
            f"the data loader samples each example with probability {sampler.sample_rate:.6g} and the ledger "
            f"records {planned.sample_rate:.6g}, but {num_samples} examples in batches of {batch_size} give "
            f"1/ceil(N/B) = {expected:.6g}; the accounted epsilon would not be this training's"
        )
    return None


def noise_refusal(optimizer: torch.optim.Optimizer, planned: LedgerEntry) -> str | None:
    """Noise > 0, and the noise the optimizer adds is the noise the ledger records."""
    added = float(getattr(optimizer, "noise_multiplier", 0.0))
    if planned.noise_multiplier <= 0 or added <= 0:
        return (
            f"a noise multiplier of {min(added, planned.noise_multiplier):g} adds no noise, yet the run would "
            "report these updates as differentially private (their epsilon is infinite)"
        )
    if not math.isclose(added, planned.noise_multiplier, rel_tol=1e-9):
        return (
            f"the optimizer adds noise with multiplier {added:g} but the ledger records {planned.noise_multiplier:g}; "
            "the accounted epsilon would not be this training's"
        )
    return None


# ---------------------------------------------------------------- samples kept apart


@contextlib.contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """Train mode (cross-sample layers mix only there), dropout off (the same output twice), and every
    buffer (BatchNorm's running statistics) put back afterwards. MultiheadAttention drops attention
    weights functionally while in train mode (its `dropout` is a float, not a module): it is put in
    eval mode too, which changes nothing else of its output."""
    dropping = (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)
    dropouts = [m for m in module.modules() if isinstance(m, dropping)]
    was_training = module.training
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.train()
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        module.train(was_training)
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > RTOL * a.abs().max() + ATOL) if a.numel() else False


def mixing_refusal(model: nn.Module, x: torch.Tensor) -> str | None:
    """Whether one example's output depends on another example of its batch, and the first layer where.

    The probe batch is (x0, x1), then (x0, x0): row 0 must be the same in every layer's output."""
    module = getattr(model, "_module", model)  # Opacus's wrapper around the model
    if len(x) < 2 or torch.equal(x[0], x[1]):
        return None  # a split of one example (or two equal ones) cannot show mixing
    other = torch.stack([x[0], x[0]])
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []

    def record(name: str) -> Callable:
        def hook(layer: nn.Module, _inputs: tuple, output: object) -> None:
            if isinstance(output, torch.Tensor) and output.dim() > 0 and len(output) == 2:
                seen.append((name, layer, output[0].detach().clone()))

        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in module.named_modules() if name]
    try:
        seed = secrets.randbits(62)
        with torch.no_grad(), _probing(module), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # any randomness left in a user's forward: the same draws for both batches
            first = module(x)
            before, seen[:] = list(seen), []
            torch.manual_seed(seed)
            second = module(other)
    finally:
        for handle in handles:
            handle.remove()
    for (name, layer, a), (_, _, b) in zip(before, seen, strict=False):
        if _differs(a, b):
            return (
                f"layer {name!r} ({type(layer).__name__}) mixes the examples of a batch: one example's output, and "
                "so the others' gradients, depends on it, and clipping no longer bounds its influence; use a "
                "per-sample layer (GroupNorm, LayerNorm) instead"
            )
    if isinstance(first, torch.Tensor) and _differs(first[0], second[0]):
        return (
            "the model mixes the examples of a batch: one example's output depends on the others, and clipping "
            "no longer bounds its influence; use per-sample layers only"
        )
    return None


# ---------------------------------------------------------------- per-sample gradients


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def _own_gradients(setup: PrivateSetup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each example's gradient of its own loss (a batch of one), computed without Opacus: (examples, values)."""
    module = getattr(setup.model, "_module", setup.model)
    params = [p for _, p in _trainable(module)]
    disable, enable = getattr(setup.model, "disable_hooks", None), getattr(setup.model, "enable_hooks", None)
    if disable is not None:
        disable()  # hooks mode: these backward passes must not leave per-sample gradients behind
    try:
        rows = []
        with _probing(module):
            for i in range(len(x)):
                loss = setup.criterion(module(x[i : i + 1]), y[i : i + 1])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads, params, strict=True)]))  # fmt: skip
        return torch.stack(rows)
    finally:
        if enable is not None:
            enable()


def gradient_refusal(setup: PrivateSetup, probe: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """Every trainable parameter gets a per-sample gradient, and what Opacus clips is each example's own."""
    x, y = probe
    module = getattr(setup.model, "_module", setup.model)
    trainable = _trainable(module)
    setup.optimizer.zero_grad(set_to_none=True)
    try:
        with _probing(module), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")  # first layer's, by design
            setup.criterion(setup.model(x), y).backward()
        per_sample = {name: getattr(p, "grad_sample", None) for name, p in trainable}
        missing = [name for name, g in per_sample.items() if not isinstance(g, torch.Tensor) or len(g) != len(x)]
        if missing:
            return (
                f"trainable parameter {missing[0]!r} receives no per-sample gradient (it is unused, or Opacus cannot "
                "compute one for its layer), so DP-SGD cannot clip or noise it; freeze it (requires_grad=False) "
                "or remove it"
            )
        clipped = torch.cat([g.detach().reshape(len(x), -1) for g in per_sample.values() if g is not None], dim=1)
    finally:
        setup.optimizer.zero_grad(set_to_none=True)  # per-sample gradients, summed gradients and .grad
    own = _own_gradients(setup, x, y)
    if not _differs(own, clipped):
        return None
    scale = float((clipped * own).sum() / (own * own).sum().clamp_min(1e-30))
    if not _differs(scale * own, clipped):
        reduction = getattr(setup.optimizer, "loss_reduction", "mean")
        return (
            f"the per-sample gradients DP-SGD clips are {scale:.3g} times each example's own gradient: the loss's "
            f"reduction does not match the one the noise is scaled for ({reduction!r} over the batch); give a loss "
            "of one value per example"
        )
    return (
        "an example's per-sample gradient depends on the other examples of its batch (the loss, or a layer, couples "
        "them), so clipping no longer bounds one example's influence; use a loss of one value per example"
    )


def probe_batch(data: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two examples of a training split for the checks: the first one, and the first later one that differs
    (scanning at most 64), so that mixing can show; a split of one example gives it twice.

    Args:
        data: the training split.
        device: where the training runs.

    Returns:
        (features, targets) of two examples, as tensors on `device`.
    """
    x0 = data[0][0]
    later = range(1, min(len(data), 65))
    second = next((i for i in later if not np.array_equal(data[i][0], x0)), min(1, len(data) - 1))
    x, y = data.batch([0, second])
    return torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.as_tensor(np.asarray(y)).to(device)


__all__ = [
    "PreflightRefusal",
    "PrivateSetup",
    "check",
    "gradient_refusal",
    "loader_refusal",
    "mixing_refusal",
    "noise_refusal",
    "probe_batch",
    "refusal",
]
