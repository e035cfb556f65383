"""A model's metrics on a dataset, per its task: exact (the server's own test set in simulation), or
each example's bounded values (what a client releases privately, privacy/releases.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtrain.data import Dataset, Transformed
from fedtrain.tasks import Classification, Task

BATCH = 256  # examples evaluated at a time: memory bounded whatever the split's size


@torch.no_grad()
def example_values(
    model: nn.Module, dataset: Dataset, device: torch.device, task: Task | None = None, batch_size: int = BATCH
) -> np.ndarray:
    """Each example's `task.values` (rows: examples; columns: values), read a batch at a time."""
    task = task or Classification()
    if task.eval_transform is not None:
        dataset = Transformed(dataset, task.eval_transform)
    model.eval()
    rows = []
    try:
        for start in range(0, len(dataset), batch_size):
            x, y = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))))
            outputs = model(torch.from_numpy(x).to(device))
            rows.append(task.example_values(outputs, torch.from_numpy(np.asarray(y)).to(device)).double().cpu().numpy())
    finally:
        model.train()
    return np.concatenate(rows) if rows else np.zeros((0, len(task.values)))


def evaluate_task(
    model: nn.Module, dataset: Dataset, device: torch.device, task: Task | None = None
) -> dict[str, float]:
    """The task's metrics on `dataset`, exactly (no noise): for data that is not a client's."""
    task = task or Classification()
    if len(dataset) == 0:
        return {name: float("nan") for name in ("loss", task.headline)}
    means = example_values(model, dataset, device, task).mean(axis=0)
    return task.report(dict(zip(task.values, (float(m) for m in means), strict=True)))


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = BATCH) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier; (nan, nan) for an empty dataset."""
    metrics = evaluate_task(model, dataset, device, Classification())
    return metrics["loss"], metrics["accuracy"]


def per_example(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's per-example cross-entropy and correctness (1.0 / 0.0)."""
    values = example_values(model, dataset, device, Classification(), batch_size)
    return values[:, 0], values[:, 1]
