"""MLflow: one MLflow run per fedtrain run, in the experiment "fedtrain", tagged with the run's id.

Parameters: the run's configuration. Metrics: every round's numbers at step = round. Artifact: the
report (report.html), never the model. The store is a folder (`mlruns/` in the current directory
by default: MLflow's SQLite store `mlflow.db` and `artifacts/` in it, what current MLflow
recommends over its file store), or any MLflow tracking URI (a server, a database).

fedtrain talks to MLflow through `MlflowClient` only (no global active run) and turns MLflow's usage
telemetry off unless the user set MLFLOW_DISABLE_TELEMETRY: a run's metrics stay where they are logged.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtrain.errors import FedtrainError
from fedtrain.server.tracking.base import TrackedRun, Tracker, round_metrics, summary_lines

if TYPE_CHECKING:
    from fedtrain.server.report.run_files import RunFiles

EXPERIMENT = "fedtrain"
RUN_ID_TAG = "fedtrain.run_id"
DEFAULT_FOLDER = "mlruns"
BATCH = 100  # MLflow takes at most 100 parameters in one call (1000 metrics)
URI_SCHEMES = ("file:", "sqlite:", "postgresql", "mysql", "mssql", "http:", "https:", "databricks")


def absolute(given: str | None) -> str:
    """`given` for another process with another working directory: a folder made absolute (the
    default ./mlruns included), a tracking URI as it is."""
    if given and given.startswith(URI_SCHEMES):
        return given
    return str(Path(given or DEFAULT_FOLDER).expanduser().resolve())


def tracking_uri(given: str | None) -> str:
    """The tracking URI `given` stands for (nothing created): what `mlflow ui --backend-store-uri` takes."""
    if given and given.startswith(URI_SCHEMES):
        return given
    return f"sqlite:///{Path(absolute(given)) / 'mlflow.db'}"


def store_uri(given: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment) for `given`: a folder (default
    ./mlruns) holding mlflow.db and artifacts/, or any MLflow tracking URI used as it is."""
    if given and given.startswith(URI_SCHEMES):
        return given, None
    folder = Path(absolute(given))
    folder.mkdir(parents=True, exist_ok=True)
    return tracking_uri(given), (folder / "artifacts").as_uri()


MISSING = "tracking to MLflow needs the mlflow-skinny package; install it with pip install 'fedtrain[track]'."


def require() -> None:
    """Raise one sentence now if MLflow is missing (before a run spends anything)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before MLflow reads it
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise FedtrainError(MISSING) from None


def _client(uri: str) -> Any:
    require()
    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema creation chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, uri: str | None = None) -> None:
        super().__init__()
        self.given = uri
        self.client: Any = None
        self.mlflow_run: str | None = None

    def open(self, run: TrackedRun) -> None:
        uri, artifacts = store_uri(self.given)
        self.where = uri
        self.client = client = _client(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        )
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.run_id}'", max_results=1
        )
        if found:
            self.mlflow_run = found[0].info.run_id
            logged = client.get_metric_history(self.mlflow_run, "round")
            self.last_round = max((int(m.step) for m in logged), default=0)
            client.update_run(self.mlflow_run, status="RUNNING")
            return
        tags = {RUN_ID_TAG: run.run_id, "fedtrain.run_dir": str(run.run_dir.resolve())}
        self.mlflow_run = client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in run.params.items()]
        for start in range(0, len(params), BATCH):
            client.log_batch(self.mlflow_run, params=params[start : start + BATCH])

    def log_round(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(row["round"])
        metrics = [Metric(name, value, stamp, step) for name, value in round_metrics(row).items()]
        self.client.log_batch(self.mlflow_run, metrics=metrics)

    def attach(self, report: Path, files: RunFiles) -> None:
        self.client.log_artifact(self.mlflow_run, str(report))
        note = "\n\n".join(summary_lines(files, report))
        self.client.set_tag(self.mlflow_run, "mlflow.note.content", note)  # shown as the run's description

    def close(self, finished: bool) -> None:
        if self.client is not None and self.mlflow_run is not None:
            self.client.set_terminated(self.mlflow_run, status="FINISHED" if finished else "FAILED")
