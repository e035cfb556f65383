"""The work after each round, as a list of observers called in order (to add one: a new module, one
line here). Each gets the Federation and the round's record, and hears when the run ends."""

from __future__ import annotations

from fedtrain.server.observers.base import Observer, RoundRecord
from fedtrain.server.observers.checkpoint import Checkpoint
from fedtrain.server.observers.history import MetricsHistory, Plot, PrivacyReport
from fedtrain.server.observers.progress import Progress
from fedtrain.server.observers.tracking import Tracking

OBSERVERS: list[type[Observer]] = [
    MetricsHistory,  # metrics.json, metrics.csv
    PrivacyReport,  # privacy.json
    Plot,  # training.png (at most once a minute, and after the last round)
    Checkpoint,  # checkpoint.ftenc: after the files above, so a resume finds them all
    Tracking,  # MLflow / TensorBoard when the config asks (track); the report attached at the end
    Progress,  # the caller's per-round callback (the CLI's live table)
]

__all__ = ["OBSERVERS", "Observer", "RoundRecord"]
