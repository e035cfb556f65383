"""The streamed exchange: each reply is screened and summed into the mean as it arrives, then dropped,
so the server's memory does not grow with the number of clients (mean-based strategies)."""

from __future__ import annotations

from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain.config import Config
from fedtrain.server.exchanges.base import Exchange, Trained
from fedtrain.server.reply_stream import stream_replies
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.strategies import central_dp
from fedtrain.strategies.registry import STREAMABLE


class StreamedExchange(Exchange):
    @classmethod
    def applies(cls, config: Config) -> bool:
        return config.strategy.name in STREAMABLE and not central_dp.uses_central_dp(config)

    def train(self, grid: Grid, strategy: ScreenedStrategy, messages: list[Message], server_round: int) -> Trained:
        replies = stream_replies(grid, messages, timeout=self.config.federation.round_timeout)
        self.book.sent(messages)  # pushed: the messages carry their ids
        answered: list[int] = []

        def noted() -> Iterator[Message]:
            for reply in replies:
                answered.append(self.book.node_of(reply))
                yield reply

        arrays, _ = strategy.aggregate_train(server_round, noted())
        self.note_missing(strategy, messages, answered)
        return Trained(arrays)
