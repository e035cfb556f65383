"""The plain exchange: send every train message, wait (bounded) for all replies, then aggregate them."""

from __future__ import annotations

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain.config import Config
from fedtrain.server.exchanges.base import Exchange, Trained
from fedtrain.server.reply_stream import collect_replies
from fedtrain.server.screened_strategy import ScreenedStrategy


class PlainExchange(Exchange):
    """Strategies that need every update at once (median, Krum, Bulyan, trimmed mean, client-level DP)."""

    @classmethod
    def applies(cls, config: Config) -> bool:
        return True  # the fallback: registered last

    def train(self, grid: Grid, strategy: ScreenedStrategy, messages: list[Message], server_round: int) -> Trained:
        replies = collect_replies(grid, messages, timeout=self.config.federation.round_timeout)
        self.book.sent(messages)
        answered = [self.book.node_of(reply) for reply in replies]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        self.note_missing(strategy, messages, answered)
        return Trained(arrays)
