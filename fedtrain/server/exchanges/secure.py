"""The secure exchange: SecAgg+'s four stages (server/secure_aggregation.py); the server learns each
client's ledger and metrics and only the unmasked mean of their updates."""

from __future__ import annotations

import logging

from flwr.app import Message
from flwr.serverapp import Grid

from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.server.exchanges.base import Exchange, Trained
from fedtrain.server.reply_stream import collect_replies
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.server.secure_aggregation import SecureAggregator

log = logging.getLogger("fedtrain")


class SecureExchange(Exchange):
    def __init__(self, config: Config, book) -> None:
        super().__init__(config, book)
        self.aggregator = SecureAggregator(config)

    @classmethod
    def applies(cls, config: Config) -> bool:
        return config.federation.secure_aggregation

    def train(self, grid: Grid, strategy: ScreenedStrategy, messages: list[Message], server_round: int) -> Trained:
        def stage(batch: list[Message]) -> list[Message]:
            replies = collect_replies(grid, batch, timeout=self.config.federation.round_timeout)
            self.book.sent(batch)
            return replies

        outcome = self.aggregator.run(stage, messages, server_round, self.book.node_of)
        arrays, _ = strategy.aggregate_mean(server_round, outcome.collected, outcome.mean, outcome.contributors)
        strategy.screened.failed.update({self.book.name(node): why for node, why in outcome.failed.items()})
        metrics = [r.content.metric_records[protocol.METRICS] for r in outcome.collected
                   if not r.has_error() and protocol.METRICS in r.content.metric_records]  # fmt: skip
        summary = {
            "contributors": outcome.contributors,
            "updates_scaled": sum(int(protocol.number(m.get(protocol.SECAGG_SCALED, 0))) for m in metrics),
            "values_clipped": sum(int(protocol.number(m.get(protocol.SECAGG_CLIPPED, 0))) for m in metrics),
        }
        if summary["values_clipped"]:
            bound = self.config.federation.secagg_update_bound
            log.warning("round %d: %d update values fell outside SecAgg+'s range [-%g, %g] and were clipped.",
                        server_round, summary["values_clipped"], bound, bound)  # fmt: skip
        return Trained(arrays, {"secure_aggregation": summary})
