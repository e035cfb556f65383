"""Observers that write a run's plain files: metrics history, privacy report, plot (server/history.py)."""

from __future__ import annotations

import time

from fedtrain.server import history
from fedtrain.server.observers.base import Observer, RoundRecord
from fedtrain.strategies import central_dp

PLOT_EVERY_SECONDS = 60.0  # training.png is redrawn at most this often, and after the last round


class MetricsHistory(Observer):
    def after_round(self, record: RoundRecord) -> None:
        fed = self.federation
        history.write_metrics(fed.run_dir, fed.rows, fed.integrity)


class PrivacyReport(Observer):
    def after_round(self, record: RoundRecord) -> None:
        fed = self.federation
        client_level = central_dp.report(record.strategy, fed.config, fed.released)
        history.write_privacy_report(fed.run_dir, fed.privacy, client_level, fed.integrity, fed.marks)


class Plot(Observer):
    """0.2 s or more of a round: drawn after the last round, and at most once a minute before."""

    def __init__(self, federation) -> None:
        super().__init__(federation)
        self.plotted = time.monotonic()

    def after_round(self, record: RoundRecord) -> None:
        if record.last or time.monotonic() - self.plotted >= PLOT_EVERY_SECONDS:
            history.write_plot(self.federation.run_dir, self.federation.rows, self.federation.integrity)
            self.plotted = time.monotonic()
