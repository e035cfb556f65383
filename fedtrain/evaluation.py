"""Loss and accuracy of a model on a dataset (used by clients and by the server's test set)."""

from __future__ import annotations

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
