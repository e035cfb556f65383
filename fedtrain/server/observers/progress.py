"""The caller's per-round callback (the CLI's live table, a test's recorder), last of all."""

from __future__ import annotations

from fedtrain.server.observers.base import Observer, RoundRecord


class Progress(Observer):
    def after_round(self, record: RoundRecord) -> None:
        self.federation.on_round(record.row)
