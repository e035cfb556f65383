"""The encrypted checkpoint after every round (server/checkpoint.py says what it holds)."""

from __future__ import annotations

from fedtrain.server import checkpoint
from fedtrain.server.observers.base import Observer, RoundRecord


class Checkpoint(Observer):
    def after_round(self, record: RoundRecord) -> None:
        fed = self.federation
        checkpoint.save(fed.run_dir, fed.model_key.key, fed.run_id, record.server_round, record.state,
                        record.strategy, fed.config, fed.rows, fed.privacy, fed.released)  # fmt: skip
