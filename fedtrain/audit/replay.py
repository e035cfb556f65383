"""What a client's round moves the model by in expectation, from its real data alone.

The white-box auditor sees each round's global weights w and the canary client's update d. Most of d
is the data's own pull, and on a small model that pull moves every coordinate about as much as one
canary does. The data is the auditor's to know (the one-run theorem holds whatever the non-canary
data is), so it replays the round without sampling, noise or canaries: from w, `steps` steps of the
client's own SGD on the expected DP-SGD gradient q * sum_i clip(g_i) / expected batch size over the
real examples. d minus that replay leaves the canaries, the noise and what sampling varies; a score
built on it depends on the canaries' inclusion only through what the client sent.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedtrain.clients.trainer import TrainSettings
from fedtrain.data import Dataset
from fedtrain.privacy.ledger import LedgerEntry
from fedtrain.tasks import Task

CHUNK = 256  # examples per backward pass of the replay


@contextlib.contextmanager
def _per_sample(model: nn.Module) -> Iterator[nn.Module]:
    """The model with Opacus's per-sample gradient hooks (the reference mode), removed afterwards."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        yield wrapped
    finally:
        wrapped.remove_hooks()


def _clipped_sum(wrapped: nn.Module, params: list[nn.Parameter], data: Dataset, task: Task, clip: float) -> list:
    """sum_i clip(g_i) over every example of `data`, one tensor per parameter."""
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(data), CHUNK):
        x, y = data.batch(np.arange(start, min(len(data), start + CHUNK)))
        for p in params:
            p.grad_sample = None  # type: ignore[attr-defined]
        with warnings.catch_warnings():  # Opacus's hooks fire on the first layer's outputs by design
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            task.loss(wrapped(torch.from_numpy(x)), torch.from_numpy(np.asarray(y))).sum().backward()
        rows = [p.grad_sample.reshape(len(x), -1) for p in params]  # type: ignore[attr-defined]
        norms = torch.cat(rows, dim=1).norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's own clipping
        for t, p in zip(total, params, strict=True):
            t += torch.einsum("i,i...->...", factor, p.grad_sample)  # type: ignore[attr-defined]
    for p in params:
        p.grad_sample = None  # type: ignore[attr-defined]
        p.grad = None
    return total


def expected_update(
    model: nn.Module,
    data: Dataset,
    task: Task,
    settings: TrainSettings,
    entry: LedgerEntry,
    dataset_size: int,
) -> dict[str, torch.Tensor]:
    """The round's update from the weights `model` holds, in expectation, without noise or canaries.

    Args:
        model: the client's model at the round's global weights (trained in place; pass a copy).
        data: the client's real training split (no canaries).
        task: the run's task (its per-example loss).
        settings: the client's local training (lr, momentum, clipping bound, FedProx's mu).
        entry: the round's ledger entry: its steps and sample rate q.
        dataset_size: the split size the expected batch size q * N is taken over (canaries included).

    Returns:
        The expected update of each trainable parameter, by name.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model.train()
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    expected_batch = max(1, int(dataset_size * entry.sample_rate))  # as Opacus divides the noisy sum
    with _per_sample(model) as wrapped:
        for _ in range(entry.steps):
            total = _clipped_sum(wrapped, params, data, task, settings.max_grad_norm)
            for p, t in zip(params, total, strict=True):
                p.grad = t * (entry.sample_rate / expected_batch)
            optimizer.step()
            if settings.proximal_mu > 0:  # as the trainer: after the step, outside clipping and noise
                with torch.no_grad():
                    for p, s in zip(params, start, strict=True):
                        p.add_(p - s, alpha=-settings.lr * settings.proximal_mu)
    return {name: (p.detach() - s) for name, p, s in zip(names, params, start, strict=True)}


__all__ = ["expected_update"]
