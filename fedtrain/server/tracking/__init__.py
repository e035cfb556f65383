"""Where ML teams already look: each round's metrics and epsilons, the run's configuration and its
report, logged to MLflow or TensorBoard as the run goes (observers/tracking.py) or afterwards from
its files (`fedtrain report --track`). The model is never logged.

    base.py                the Tracker interface; a round's numbers; a configuration's parameters
    mlflow_store.py        MLflow: one MLflow run per fedtrain run (optional extra fedtrain[track])
    tensorboard_events.py  TensorBoard event files in RUN_DIR/tensorboard (optional extra fedtrain[track])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from fedtrain.errors import FedtrainError
from fedtrain.server.model_files import MODEL_FILE
from fedtrain.server.tracking import mlflow_store, tensorboard_events
from fedtrain.server.tracking.base import TrackedRun, Tracker, config_params, round_metrics

if TYPE_CHECKING:
    from fedtrain.server.report import WrittenReport

TRACKERS: dict[str, tuple[Callable[[], None], Callable[[str | None], Tracker]]] = {
    "mlflow": (mlflow_store.require, lambda uri: mlflow_store.MlflowTracker(uri)),
    "tensorboard": (tensorboard_events.require, lambda uri: tensorboard_events.TensorBoardTracker()),
}


def make_trackers(names: Iterable[str], mlflow_uri: str | None = None) -> list[Tracker]:
    """One tracker per name, each checked to be installed.

    Args:
        names: "mlflow", "tensorboard" (each at most once).
        mlflow_uri: MLflow's store: a folder (default ./mlruns) or any MLflow tracking URI.

    Returns:
        The trackers, not yet opened.

    Raises:
        FedtrainError: an unknown name, or a tracker whose package is not installed.
    """
    trackers = []
    for name in dict.fromkeys(names):
        if name not in TRACKERS:
            raise FedtrainError(f"cannot track to {name!r}; fedtrain tracks to {' or '.join(TRACKERS)}.")
        require, make = TRACKERS[name]
        require()
        trackers.append(make(mlflow_uri))
    return trackers


def log_finished_run(trackers: list[Tracker], written: WrittenReport) -> list[str]:
    """Log a run from its verified files, and attach its report (`fedtrain report --track`): a
    record that already holds the run (tracked live, or logged before) gets only the rounds it lacks.

    Args:
        trackers: from `make_trackers`, not yet opened.
        written: the report just written, with the verified files it was made of.

    Returns:
        One line per tracker saying what it logged.

    Raises:
        FedtrainError: a tracker failed (its store unreachable, say), in one sentence.
    """
    files = written.files
    run = TrackedRun(files.run_id, files.name, files.run_dir, config_params(files.config))
    finished = MODEL_FILE in files.fingerprints  # a run that stopped early has no final model
    lines = []
    for tracker in trackers:
        try:
            tracker.open(run)
            logged = tracker.sync(files.rows)
            tracker.attach(written.path, files)
            tracker.close(finished)
        except FedtrainError:
            raise
        except Exception as exc:  # whatever the tracking library raises, in one sentence
            raise FedtrainError(f"tracking to {tracker.name} failed ({type(exc).__name__}: {exc}).") from None
        lines.append(
            f"{tracker.name}: logged {logged} rounds of run {files.name}"
            + (f" ({len(files.rows) - logged} were there already)" if logged < len(files.rows) else "")
            + f" and attached {written.path.name}"
            + (f" ({tracker.where})." if tracker.where else ".")
        )
    return lines


__all__ = ["TRACKERS", "TrackedRun", "Tracker", "config_params", "log_finished_run", "make_trackers", "round_metrics"]
