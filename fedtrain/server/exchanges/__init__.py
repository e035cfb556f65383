"""How a round's train messages reach the clients and their replies the strategy: one exchange per
run, the first registered here that applies to its config (to add one: a new module, one line here)."""

from __future__ import annotations

from fedtrain.config import Config
from fedtrain.server.exchanges.base import Exchange, Trained
from fedtrain.server.exchanges.plain import PlainExchange
from fedtrain.server.exchanges.secure import SecureExchange
from fedtrain.server.exchanges.streamed import StreamedExchange
from fedtrain.server.node_book import NodeBook

EXCHANGES: list[type[Exchange]] = [
    SecureExchange,
    StreamedExchange,
    PlainExchange,  # applies to every run: last
]


def exchange_for(config: Config, book: NodeBook) -> Exchange:
    """The exchange that serves every round of a run with `config`."""
    return next(cls for cls in EXCHANGES if cls.applies(config))(config, book)


__all__ = ["EXCHANGES", "Exchange", "Trained", "exchange_for"]
