"""What a run leaves behind in its run directory besides the model: the per-round metrics history
(JSON + CSV), a plot of accuracy and epsilon per client, and the privacy report with every client's ledger.
Each file is recorded, as written, in the run's integrity record (security/run_integrity.py)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fedtrain.fileio import atomic_write_bytes
from fedtrain.security.run_integrity import RunIntegrity
from fedtrain.server.screening import ClientPrivacy

METRICS_JSON, METRICS_CSV, PLOT, PRIVACY_JSON = "metrics.json", "metrics.csv", "training.png", "privacy.json"
PROTECTED = (METRICS_JSON, METRICS_CSV, PRIVACY_JSON, PLOT)  # the plain files a run's integrity record covers
CSV_COLUMNS = (
    "round",
    "accuracy",
    "loss",
    "federated_accuracy",
    "federated_accuracy_std",
    "federated_loss",
    "federated_loss_std",
    "train_loss",
    "train_loss_std",
    "clients_ok",
    "clients_refused",
    "clients_failed",
    "epsilon_max",
    "client_epsilon",
    "seconds",
)


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(run_dir: Path, rows: list[dict[str, Any]], integrity: RunIntegrity | None = None) -> None:
    """metrics.json (a list, one object per round) and metrics.csv (flat, one column per client)."""
    metrics_json = json.dumps(_json_safe(rows), indent=2) + "\n"
    clients = sorted({cid for row in rows for cid in row.get("epsilon", {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*CSV_COLUMNS, *(f"epsilon_{cid}" for cid in clients)])
    for row in rows:
        base = [row.get(col) for col in CSV_COLUMNS]
        writer.writerow(["" if v is None else v for v in base] + [row["epsilon"].get(cid, "") for cid in clients])
    _write(run_dir, {METRICS_JSON: metrics_json.encode(), METRICS_CSV: buffer.getvalue().encode()}, integrity)


PLAIN_METRICS_WARNING = (
    "metrics are plain for {names}: their exact train loss and held-out loss/accuracy left those clients "
    "outside the differential-privacy guarantee (each client's policy allowed it)"
)


def privacy_report(
    clients: dict[str, ClientPrivacy], client_level: dict[str, Any] | None = None, marks: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What privacy.json holds: per client its accountant, delta, full ledger (every DP-SGD round and
    every metric release), its run epsilon and, where it shares it, its lifetime epsilon; first, what
    the run is when it is not an ordinary one (`marks`: an audit's canaries, a positive control)."""
    plain = sorted(cid for cid, info in clients.items() if info.metrics == "plain")
    report: dict[str, Any] = {
        **(marks or {}),
        "note": "epsilon is cumulative over every ledger entry of this run: DP-SGD rounds (kind train) and "
        "metric releases (kind metrics, the Gaussian mechanism: sample_rate 1, one step); recompute it with "
        "any accountant from noise_multiplier, sample_rate and steps. A private tuning (kind tuning) is the "
        "best of K ~ truncated negative binomial (eta, gamma) trials of those steps, accounted in RDP by "
        "Papernot and Steinke's Theorem 2. lifetime_epsilon composes every run over the client's data, as "
        "the client reports it.",
        "metrics": PLAIN_METRICS_WARNING.format(names=", ".join(plain))
        if plain
        else "private or none for every client: every metric computed on private data is on the ledger",
        "clients": {
            cid: {
                "accountant": info.ledger.accountant,
                "delta": info.delta,
                "epsilon": info.epsilon,
                "lifetime_epsilon": info.lifetime_epsilon,
                "metrics": info.metrics,
                "ledger": [e.to_dict() for e in info.ledger.entries],
            }
            for cid, info in sorted(clients.items())
        },
    }
    if client_level is not None:
        report["client_level"] = client_level
    return report


def write_privacy_report(
    run_dir: Path,
    clients: dict[str, ClientPrivacy],
    client_level: dict[str, Any] | None = None,
    integrity: RunIntegrity | None = None,
    marks: dict[str, Any] | None = None,
) -> None:
    """privacy.json (see `privacy_report`), atomically, and its digest in the run's integrity record."""
    report = privacy_report(clients, client_level, marks)
    _write(run_dir, {PRIVACY_JSON: (json.dumps(_json_safe(report), indent=2) + "\n").encode()}, integrity)


def add_privacy_section(run_dir: Path, name: str, section: dict[str, Any], integrity: RunIntegrity) -> None:
    """privacy.json with one more top-level section (`fedtrain audit`'s), through the integrity record.

    Raises:
        FedtrainError: the run's reports are not as fedtrain wrote them (an edit is never carried on).
    """
    integrity.require_intact(PROTECTED)
    report = json.loads((Path(run_dir) / PRIVACY_JSON).read_text(encoding="utf-8"))
    report[name] = section
    _write(run_dir, {PRIVACY_JSON: (json.dumps(_json_safe(report), indent=2) + "\n").encode()}, integrity)


def write_plot(run_dir: Path, rows: list[dict[str, Any]], integrity: RunIntegrity | None = None) -> None:
    """training.png: the headline metric per round, each client's epsilon per round, and the metric
    against the epsilon spent (server/plots.py)."""
    from fedtrain.server import plots  # matplotlib: loaded when the first plot is drawn

    _write(run_dir, {PLOT: plots.png(plots.training_figure(rows))}, integrity)


def _write(run_dir: Path, files: dict[str, bytes], integrity: RunIntegrity | None) -> None:
    """Write plain run files atomically; with `integrity`, also recorded under the run's model key."""
    if integrity is not None:
        integrity.write(files)  # crash-safe: security/run_integrity.py
        return
    for name, data in files.items():
        atomic_write_bytes(run_dir / name, data)
