"""Local DP-SGD training of one round with Opacus (Poisson sampling, per-sample clipping, noise)."""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from fedtrain.clients.grad_sample_mode import (
    GHOST,
    autocast,
    choose_grad_sample_mode,
    clip_grad_samples_in_float32,
    memory_cap_bytes,
    set_empty_grad_samples,
)
from fedtrain.components import ClientProbe
from fedtrain.data import Dataset, Transformed
from fedtrain.privacy import preflight
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtrain.privacy.preflight import PrivateSetup
from fedtrain.tasks import Classification, Task

log = logging.getLogger("fedtrain")


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int
    local_epochs: int
    lr: float
    momentum: float
    max_grad_norm: float
    proximal_mu: float = 0.0  # FedProx: the server's strategy sends it with each round
    # Large logical batches on a small GPU: Opacus's BatchMemoryManager computes each Poisson batch in
    # physical chunks of at most this many samples and takes one DP step per logical batch (same privacy).
    max_physical_batch_size: int | None = None
    grad_sample_mode: str = "auto"  # or an Opacus mode; "ghost" (ghost clipping) is taken when memory needs it
    grad_sample_memory_mib: float | None = None  # cap on per-sample gradients; None: a quarter of the device
    precision: str = "fp32"  # "bf16": forward under autocast, per-sample gradients clipped in float32

    @property
    def physical_batch(self) -> int:
        """The batch whose per-sample gradients are held at once (the expected Poisson batch, or its chunks)."""
        return self.max_physical_batch_size or self.batch_size


@dataclass(frozen=True)
class RoundResult:
    num_examples: int
    loss: float
    entry: LedgerEntry


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Silence two known-harmless warnings: we seed from the OS CSPRNG ourselves (Opacus's secure
    mode needs torchcsprng), and Opacus's hooks fire on first-layer outputs by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        yield


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Opacus's Poisson loader runs len(loader) = ceil(N / B) steps per epoch."""
    return max(1, math.ceil(num_samples / batch_size))


def sample_rate(num_samples: int, batch_size: int) -> float:
    """Opacus samples each example with probability 1 / len(loader)."""
    return 1.0 / steps_per_epoch(num_samples, batch_size)


def planned_round(num_samples: int, settings: TrainSettings, noise_multiplier: float) -> LedgerEntry:
    """What one round will spend, known before it runs (for the budget check)."""
    return LedgerEntry(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate(num_samples, settings.batch_size),
        steps=settings.local_epochs * steps_per_epoch(num_samples, settings.batch_size),
    )


def private_step(
    private_model: nn.Module,
    private_optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str = "fp32",
) -> torch.Tensor | None:
    """One DP-SGD step on a batch; its loss, or None for an empty batch. `criterion` is the batch's mean
    loss, or with ghost clipping Opacus's wrapper of it (whose backward runs both passes)."""
    private_optimizer.zero_grad(set_to_none=True)
    if len(y) == 0:
        # An empty Poisson batch still counts: Opacus adds pure noise and the accountant counts the step.
        # No forward pass (expanded weights refuse a batch of 0): its per-sample gradients are set directly.
        set_empty_grad_samples(private_model)
        loss = None
    else:
        with autocast(x.device, precision):
            loss = criterion(private_model(x), y)
        with _quiet_opacus():
            loss.backward()
        clip_grad_samples_in_float32(private_model)
    private_optimizer.step()
    return loss


@dataclass
class PrivateTraining:
    """One round's DP-SGD, as Opacus made it: engine (its accountant), private model, optimizer, loader."""

    engine: PrivacyEngine
    setup: PrivateSetup
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # what the steps call (ghost: Opacus's wrapper)
    ghost: bool = False


def private_training(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    device: torch.device,
    task: Task,
) -> PrivateTraining:
    """Opacus's private model, optimizer and Poisson loader for one round over `data`.

    Only parameters with `requires_grad` are trained (a frozen backbone stays as it is), and the
    data is read a Poisson batch at a time (with the task's train transform, if any). The
    PrivacyEngine's accountant starts from the ledger's history, so Opacus itself accounts
    cumulatively.
    """
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    dataset = Transformed(data, task.train_transform) if task.train_transform is not None else data
    # a map-style dataset (len, items) is all DataLoader and Opacus's Poisson sampler need
    loader: DataLoader = DataLoader(
        TensorItems(dataset), batch_size=settings.batch_size, pin_memory=device.type == "cuda"
    )
    optimizer = torch.optim.SGD(trainable, lr=settings.lr, momentum=settings.momentum)
    with _quiet_opacus():
        engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = ledger.history()
    mode = choose_grad_sample_mode(
        model, data.input_shape, device, requested=settings.grad_sample_mode, batch=settings.physical_batch,
        memory_cap_bytes=memory_cap_bytes(settings.grad_sample_memory_mib), precision=settings.precision,
    )  # fmt: skip
    log.debug("per-sample gradients with Opacus grad_sample_mode=%s on %s", mode, device)
    # torch's default generator starts from a fixed seed in every process: seed the Poisson
    # sampler and the noise from the OS's CSPRNG so neither can be predicted.
    torch.manual_seed(secrets.randbits(63))
    noise_generator = torch.Generator(device=device)
    noise_generator.manual_seed(secrets.randbits(63))
    task_loss = TaskLoss(task)
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
        grad_sample_mode=mode,
        criterion=task_loss,
    )
    # ghost clipping also returns its criterion wrapper: loss.backward() runs its two backward passes
    private_model, private_optimizer, criterion, private_loader = (
        made if mode == GHOST else (*made[:2], task_loss, made[2])
    )
    # the preflight checks the plain mean loss; the steps use `criterion` (ghost clipping's wrapper of it)
    setup = PrivateSetup(private_model, private_optimizer, private_loader, task_loss)
    return PrivateTraining(engine, setup, criterion, ghost=mode == GHOST)


def train_round(
    model: nn.Module,
    data: Dataset,
    settings: TrainSettings,
    noise_multiplier: float,
    ledger: PrivacyLedger,
    device: torch.device,
    task: Task | None = None,
    planned: LedgerEntry | None = None,
    probe: ClientProbe | None = None,
) -> RoundResult:
    """Train `model` in place for one round of DP-SGD and return what it spent.

    The DP preflight (privacy/preflight.py) checks the private setup against `planned` (by default
    what `planned_round` computes) before the first step. `probe` is an audit's instrumentation of a
    simulated client (fedtrain/audit), told of the setup after the preflight; never set otherwise.

    Raises:
        PreflightRefusal: the setup would break the guarantee the ledger records (one sentence).
    """
    task = task or Classification()
    planned = planned or planned_round(len(data), settings, noise_multiplier)
    training = private_training(model, data, settings, noise_multiplier, ledger, device, task)
    setup = training.setup
    # Ghost clipping keeps no per-sample gradients to compare: choose_grad_sample_mode took it only after
    # its clipped sum matched hooks' on a probe, so only the sampling, noise and mixing checks apply.
    preflight.check(setup, planned, len(data), settings.batch_size, preflight.probe_batch(data, device),
                    gradients=not training.ghost)  # fmt: skip
    if probe is not None:
        probe.trainer_ready(setup.model, setup.optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable]  # w_t, for FedProx's proximal term
    steps_before = sum(step for *_, step in training.engine.accountant.history)
    private_model, private_optimizer, criterion = setup.model, setup.optimizer, training.criterion
    loss_sum, loss_count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    with _batches(setup.loader, private_optimizer, settings.max_physical_batch_size) as batches:
        for _ in range(settings.local_epochs):
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = private_step(private_model, private_optimizer, criterion, x, y, settings.precision)
                if settings.proximal_mu > 0 and not getattr(private_optimizer, "_is_last_step_skipped", False):
                    # The proximal term's gradient mu (w - w_t) depends on no example: it is applied after
                    # the private step, outside clipping and noise, and costs no privacy.
                    with torch.no_grad():
                        for param, start in zip(trainable, anchor, strict=True):
                            param.add_(param - start, alpha=-settings.lr * settings.proximal_mu)
                if loss is not None:
                    loss_sum += loss.detach() * len(y)
                    loss_count += len(y)
    steps_after = sum(step for *_, step in training.engine.accountant.history)
    rate = setup.loader.batch_sampler.sample_rate  # type: ignore[union-attr]  # Opacus's Poisson sampler
    entry = LedgerEntry(noise_multiplier, rate, steps_after - steps_before)
    return RoundResult(len(data), float(loss_sum) / max(1, loss_count), entry)


class TensorItems(torch.utils.data.Dataset):
    """A fedtrain Dataset whose items are torch tensors (Opacus builds its empty batches from their dtypes)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[index]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(y)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (torch.from_numpy(np.ascontiguousarray(x)), torch.as_tensor(y)) for x, y in self.data.__getitems__(indices)
        ]


class TaskLoss(nn.Module):
    """The batch's mean of the task's per-example loss (the reduction Opacus's noise is scaled for), or
    the per-example losses when Opacus's ghost clipping sets `reduction = "none"`."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task
        self.reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_example = self.task.loss(outputs.float(), targets)  # in float32 under autocast too
        return per_example if self.reduction == "none" else per_example.mean()


@contextlib.contextmanager
def _batches(loader: DataLoader, optimizer, max_physical: int | None) -> Iterator:
    """The private loader itself, or Opacus's BatchMemoryManager splitting its batches."""
    if max_physical is None:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=max_physical, optimizer=optimizer) as split:
        yield split
