"""TensorBoard: event files in RUN_DIR/tensorboard, so `tensorboard --logdir runs` shows every run
under its run directory's name.

Scalars: every round's numbers at step = round (each client's epsilon under `epsilon/<client>`).
Text: the run's configuration, and at the end a summary of the privacy card with the report's path.
Written with PyTorch's SummaryWriter (the `tensorboard` package, extra fedtrain[track]).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtrain.errors import FedtrainError
from fedtrain.server.tracking.base import TrackedRun, Tracker, round_metrics, summary_lines

if TYPE_CHECKING:
    from fedtrain.server.report.run_files import RunFiles

FOLDER = "tensorboard"
MISSING = "tracking to TensorBoard needs the tensorboard package; install it with pip install 'fedtrain[track]'."


def require() -> None:
    """Raise one sentence now if TensorBoard's writer is missing (before a run spends anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FedtrainError(MISSING) from None


def last_logged_round(logdir: Path) -> int:
    """The last round the event files in `logdir` hold (0 when there are none)."""
    if not any(logdir.glob("events.out.tfevents.*")):
        return 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    if "round" not in events.Tags().get("scalars", []):
        return 0
    return max(int(e.step) for e in events.Scalars("round"))


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, logdir: Path | None = None) -> None:
        super().__init__()
        self.logdir = logdir
        self.writer: Any = None

    def open(self, run: TrackedRun) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        logdir = self.logdir or run.run_dir / FOLDER
        self.where = str(logdir)
        self.last_round = last_logged_round(logdir)
        self.writer = SummaryWriter(log_dir=str(logdir))
        if self.last_round == 0:
            rows = "\n".join(f"| {name} | {value} |" for name, value in run.params.items())
            self.writer.add_text("config", f"fedtrain run `{run.run_id}`\n\n| option | value |\n|---|---|\n{rows}", 0)
        self.writer.flush()

    def log_round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for name, value in round_metrics(row).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def attach(self, report: Path, files: RunFiles) -> None:
        text = "\n\n".join(summary_lines(files, report.resolve()))
        self.writer.add_text("report", text, self.last_round)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        if self.writer is not None:
            self.writer.close()
