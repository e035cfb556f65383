"""Every round's numbers to the trackers the run's config names (`track`: MLflow, TensorBoard), and
the run's report attached when it completes (server/tracking/).

Trackers are opened before the first round, so a missing package or an unreachable store stops the
run before it spends any privacy. After that, a tracker that fails is dropped with a warning: the
training, and the budget it has spent, is worth more than a dashboard, and `fedtrain report RUN_DIR
--track ...` logs the run from its files afterwards. A resumed run continues its own records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from fedtrain.errors import FedtrainError
from fedtrain.server.observers.base import Observer, RoundRecord
from fedtrain.server.tracking import TrackedRun, Tracker, config_params, make_trackers

log = logging.getLogger("fedtrain")


class Tracking(Observer):
    def __init__(self, federation) -> None:
        super().__init__(federation)
        deployment = federation.config.deployment
        self.trackers: list[Tracker] = make_trackers(deployment.track or [], deployment.mlflow_uri)
        if not self.trackers:
            return
        sections = {
            s: vars(getattr(federation.config, s))
            for s in ("data", "federation", "strategy", "privacy", "training", "deployment")
        }
        run = TrackedRun(
            federation.run_id, federation.run_dir.resolve().name, federation.run_dir, config_params(sections)
        )
        for tracker in self.trackers:
            try:
                tracker.open(run)
            except FedtrainError:
                raise
            except Exception as exc:  # whatever the tracking library raises: one sentence, before round 1
                raise FedtrainError(
                    f"cannot track to {tracker.name} ({_reason(exc)}); the run did not start. Fix the store "
                    "(mlflow_uri) or leave out track."
                ) from None

    def after_round(self, record: RoundRecord) -> None:
        rows = self.federation.rows
        for tracker in list(self.trackers):
            self._guarded(tracker, partial(tracker.sync, rows))

    def after_run(self, completed: bool) -> None:
        if not self.trackers:
            return
        if completed:
            from fedtrain.server.report import REPORT_FILE, write_report

            fed = self.federation
            try:
                report = write_report(fed.run_dir, fed.model_key)
            except FedtrainError as exc:
                log.warning("no %s to attach to the run's trackers: %s", REPORT_FILE, exc)
            else:
                for tracker in list(self.trackers):
                    self._guarded(tracker, partial(tracker.attach, report.path, report.files))
        for tracker in list(self.trackers):
            self._guarded(tracker, partial(tracker.close, completed))

    def _guarded(self, tracker: Tracker, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # tracking never stops a run that has spent privacy
            self.trackers.remove(tracker)
            fed = self.federation
            log.warning(
                "tracking to %s stopped (%s); the run goes on, and `fedtrain report %s --track %s` logs it from "
                "its files afterwards.",
                tracker.name,
                _reason(exc),
                fed.run_dir,
                tracker.name,
            )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
