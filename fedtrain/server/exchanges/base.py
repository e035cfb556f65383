"""What every exchange does: send a round's train messages, get the replies to the strategy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedtrain.config import Config
from fedtrain.server.node_book import NodeBook
from fedtrain.server.screened_strategy import ScreenedStrategy


@dataclass
class Trained:
    """One round's training, as the loop records it: the new global arrays (None: the model stays),
    and what the exchange adds to the round's row (e.g. secure aggregation's counts)."""

    arrays: ArrayRecord | None
    row: dict[str, Any] = field(default_factory=dict)


class Exchange(ABC):
    """How one round's train messages reach the clients and their replies reach the strategy.

    Subclasses register in exchanges/__init__.py; the first whose `applies` is true for the run's
    config serves every round of it."""

    def __init__(self, config: Config, book: NodeBook) -> None:
        self.config, self.book = config, book

    @classmethod
    @abstractmethod
    def applies(cls, config: Config) -> bool:
        """Whether this exchange serves a run with `config`."""

    @abstractmethod
    def train(self, grid: Grid, strategy: ScreenedStrategy, messages: list[Message], server_round: int) -> Trained:
        """Send `messages` (the strategy's train messages) through `grid`; aggregate with `strategy`."""

    def note_missing(self, strategy: ScreenedStrategy, messages: list[Message], answered: list[int]) -> None:
        """Every node that never answered is a failure of this round."""
        strategy.screened.failed.update(self.book.missing(messages, answered, "no reply within round_timeout"))
