"""What an observer of the round loop sees: the Federation, and one round's record."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.serverapp.strategy import Strategy

if TYPE_CHECKING:
    from fedtrain.server.loop import Federation


@dataclass
class RoundRecord:
    """One finished round: its row (metrics.json), the global model after it, the strategy (the
    wrapped Flower strategy: its optimizer state is checkpointed) and whether it is the last one
    (the run's final round, or the one that stops the run)."""

    server_round: int
    row: dict[str, Any]
    state: OrderedDict[str, torch.Tensor]
    strategy: Strategy
    last: bool


class Observer:
    """Called after every round, in the order of observers.OBSERVERS, and once when the run ends."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation

    def after_round(self, record: RoundRecord) -> None:
        raise NotImplementedError

    def after_run(self, completed: bool) -> None:
        """The run ended: `completed` (every round and the final model written), or stopped by an error."""
