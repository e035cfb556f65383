"""What every tracker does, and what it logs: a round's numbers and a run's configuration.

A tracker holds one record per fedtrain run (an MLflow run, a folder of TensorBoard event files),
found again by the run's id, so a resumed run, or `fedtrain report --track` after a live-tracked
run, adds to the same record instead of starting another. It never logs the model.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtrain.server.report.run_files import RunFiles

NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")  # what MLflow refuses in a metric or parameter name


@dataclass
class TrackedRun:
    """The fedtrain run a tracker records."""

    run_id: str
    name: str  # the run directory's name
    run_dir: Path
    params: dict[str, str]  # "section.option" -> value, the run's configuration


class Tracker(ABC):
    """One place a run is logged to. `open` first; then `log_round` per round, `attach` the report,
    `close` at the end. Raising is fine: the caller decides what a failure costs."""

    name: str = ""

    def __init__(self) -> None:
        self.last_round = 0  # the last round this tracker's record holds
        self.where = ""  # where the record is (a store's URI, a folder), once opened

    @abstractmethod
    def open(self, run: TrackedRun) -> None:
        """Find this run's record (setting `last_round`) or start one with the run's configuration."""

    @abstractmethod
    def log_round(self, row: dict[str, Any]) -> None:
        """Record one round's numbers (`round_metrics`) at step = the round."""

    @abstractmethod
    def attach(self, report: Path, files: RunFiles) -> None:
        """Attach the run's report (report.html) with a few lines of summary."""

    @abstractmethod
    def close(self, finished: bool) -> None:
        """End the record: the run finished, or stopped."""

    def sync(self, rows: list[dict[str, Any]]) -> int:
        """Log every row after `last_round`, in order; the number logged."""
        logged = 0
        for row in rows:
            if int(row["round"]) > self.last_round:
                self.log_round(row)
                self.last_round = int(row["round"])
                logged += 1
        return logged


def safe_name(name: str) -> str:
    """A metric or parameter name every tracker accepts."""
    return NAME_UNSAFE.sub("_", name)


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A round's numbers by name: the headline metric under its own name (`accuracy`, `r2`...) and
    its federated twin, losses, clients ok / refused / failed, the largest and each client's epsilon
    (`epsilon/<client>`), client-level epsilon, SecAgg+ counts, seconds. Missing values are left out."""
    metric = str(row.get("metric") or "accuracy")
    named = {
        metric: row.get("accuracy"),
        "loss": row.get("loss"),
        f"federated_{metric}": row.get("federated_accuracy"),
        f"federated_{metric}_std": row.get("federated_accuracy_std"),
        "federated_loss": row.get("federated_loss"),
        "federated_loss_std": row.get("federated_loss_std"),
        **{f"federated_{k}": v for k, v in (row.get("federated") or {}).items()},
        "train_loss": row.get("train_loss"),
        "train_loss_std": row.get("train_loss_std"),
        "clients_ok": row.get("clients_ok"),
        "clients_refused": row.get("clients_refused"),
        "clients_failed": row.get("clients_failed"),
        "epsilon_max": row.get("epsilon_max"),
        **{f"epsilon/{cid}": eps for cid, eps in (row.get("epsilon") or {}).items()},
        "client_epsilon": row.get("client_epsilon"),
        "client_clipping_norm": row.get("client_clipping_norm"),
        **{f"secure_aggregation/{k}": v for k, v in (row.get("secure_aggregation") or {}).items()},
        "seconds": row.get("seconds"),
        "round": row.get("round"),
    }
    return {
        safe_name(name): float(value)
        for name, value in named.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def config_params(sections: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The run's configuration as "section.option" -> text (lists as TOML-like text)."""
    params = {}
    for section, values in sections.items():
        for name, value in values.items():
            if value is None:
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            params[safe_name(f"{section}.{name}")] = text
    return params


def summary_lines(files: RunFiles, report: Path) -> list[str]:
    """A few lines about the run's privacy, for a tracker's notes (the report has everything)."""
    from fedtrain.server.report import card

    spending = card.client_spending(files)
    lines = []
    if spending:
        worst = max(spending, key=lambda s: s.epsilon)
        lines.append(
            f"Record-level DP (DP-SGD) on every client: epsilon <= {worst.epsilon:.3f} at delta {worst.delta:g} "
            f"for each of {len(spending)} clients ({', '.join(sorted({s.accountant.upper() for s in spending}))})."
        )
    for protection in card.protections(files)[1:3]:
        lines.append(f"{protection.name}: {protection.status}.")
    audits = card.audits(files)
    lines.append(
        "Audit: " + "; ".join(f"{a.scope}: epsilon >= {a.epsilon_lower:.3f}" for a in audits)
        if audits
        else "No audit was run."
    )
    lines.append(f"Full privacy card and report: {report} (fedtrain report {files.run_dir}).")
    return lines
