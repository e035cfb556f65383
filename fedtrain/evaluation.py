"""Loss and accuracy of a model on a dataset (used by clients and by the server's test set)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtrain.data import Dataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; (nan, nan) for an empty dataset."""
    if len(dataset) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum, correct = 0.0, 0
    x_all, y_all = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    for start in range(0, len(dataset), batch_size):
        x = x_all[start : start + batch_size].to(device)
        y = y_all[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    model.train()
    return loss_sum / len(dataset), correct / len(dataset)


@torch.no_grad()
def per_example(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Each example's cross-entropy and whether the model gets it right (1.0 / 0.0): what a client's
    private metric releases sum, after clipping (privacy/releases.py)."""
    model.eval()
    losses, correct = [], []
    x_all, y_all = torch.from_numpy(dataset.x), torch.from_numpy(dataset.y)
    for start in range(0, len(dataset), batch_size):
        x = x_all[start : start + batch_size].to(device)
        y = y_all[start : start + batch_size].to(device)
        logits = model(x)
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none").double().cpu().numpy())
        correct.append((logits.argmax(dim=1) == y).double().cpu().numpy())
    model.train()
    if not losses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(losses), np.concatenate(correct)
