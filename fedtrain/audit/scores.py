"""Each canary's score: higher means "more likely included". The guesses follow from the ranking.

- input canaries (black-box): minus the final model's loss on the canary;
- gradient canaries (white-box): how far the canary client's updates, summed over its rounds, moved
  the canary's coordinate against its gradient beyond what the client's real data moves it
  (audit/replay.py). An included canary's gradient C e_c, each time Poisson sampling picks it, moves
  coordinate c by -lr C / (q N); an excluded one never touches it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedtrain.audit.canaries import CanarySet, Round, trainable_names
from fedtrain.audit.replay import expected_update
from fedtrain.clients.trainer import TrainSettings
from fedtrain.data import Dataset
from fedtrain.errors import FedtrainError
from fedtrain.tasks import Task


def input_scores(canaries: CanarySet, model: nn.Module, task: Task) -> np.ndarray:
    """Minus the final model's loss on each input canary (black-box: the model is all it needs).

    Args:
        canaries: input canaries.
        model: the run's final model.
        task: the run's task (its per-example loss).

    Returns:
        One score per canary.
    """
    assert canaries.inputs is not None
    model.eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(canaries.inputs))
        losses = task.loss(outputs, torch.from_numpy(np.asarray(canaries.targets)))
    return -losses.reshape(len(canaries.inputs)).double().numpy()


def gradient_scores(
    canaries: CanarySet,
    rounds: list[Round],
    make_model: Callable[[], nn.Module],
    train: Dataset,
    task: Task,
    settings: TrainSettings,
) -> np.ndarray:
    """Minus each gradient canary's coordinate of the canary client's updates, less their replay.

    Args:
        canaries: gradient canaries.
        rounds: what the canary client sent, round by round.
        make_model: a new model of the run's architecture.
        train: the canary client's real training split (no canaries).
        task: the run's task.
        settings: the client's local training settings.

    Returns:
        One score per canary.

    Raises:
        FedtrainError: the canary client sent no update.
    """
    if not rounds:
        raise FedtrainError(f"{canaries.client_name} sent no update in the whole run, so there is nothing to audit.")
    assert canaries.coordinates is not None
    # the split size the expected batch is over: the expected number of canaries, not the drawn one, so
    # the scores depend on the inclusion bits only through what the client sent
    size = len(train) + canaries.m // 2
    residual: torch.Tensor | None = None
    for sent in rounds:
        model = make_model()
        model.load_state_dict(sent.start, strict=True)
        names = trainable_names(model)
        replayed = expected_update(model, train, task, settings, sent.entry, size)
        flat = torch.cat([(sent.update[name].double() - replayed[name].double()).reshape(-1) for name in names])
        residual = flat if residual is None else residual + flat
    assert residual is not None
    return -residual[torch.from_numpy(canaries.coordinates)].numpy()


__all__ = ["gradient_scores", "input_scores"]
