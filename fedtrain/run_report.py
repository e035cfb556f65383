"""What `fedtrain` prints about a run: the live table of rounds, the summary at the end (privacy
spent, where the model is), and which clients each round lost and why."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_table(rows: list[dict[str, Any]], total: int, client_level: bool = False) -> Table:
    table = Table(title=f"fedtrain simulate: {len(rows)}/{total} rounds", title_justify="left")
    columns = ("round", "acc", "loss", "train", "ok", "refused", "failed", "max eps", "sec")
    for column in columns[:-1] + (("client eps",) if client_level else ()) + columns[-1:]:
        table.add_column(column, justify="right")
    for row in rows:
        client_eps = (fmt(row.get("client_epsilon"), 3),) if client_level else ()
        table.add_row(
            str(row["round"]),
            fmt(row["accuracy"]),
            fmt(row["loss"]),
            fmt(row["train_loss"]),
            str(row["clients_ok"]),
            str(row["clients_refused"]),
            str(row["clients_failed"]),
            fmt(row["epsilon_max"], 3),
            *client_eps,
            fmt(row["seconds"], 1),
        )
    return table


def earlier_rows(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def failure_summary(rows: list[dict[str, Any]], names_shown: int = 5) -> list[str]:
    """One line per round that lost clients: who failed or refused, grouped by reason."""
    lines = []
    for row in rows:
        parts = []
        for kind in ("failed", "refused"):
            by_reason: dict[str, list[str]] = {}
            for name, reason in (row.get(kind) or {}).items():
                by_reason.setdefault(reason, []).append(name)
            for reason, names in by_reason.items():
                more = f" and {len(names) - names_shown} more" if len(names) > names_shown else ""
                parts.append(f"{kind} {', '.join(names[:names_shown])}{more}: {reason}")
        if parts:
            lines.append(f"  round {row['round']}: " + "; ".join(parts))
    return lines


def print_failures(console: Console, rows: list[dict[str, Any]]) -> None:
    lines = failure_summary(rows)
    if lines:
        console.print(f"clients missing from {len(lines)} of {len(rows)} rounds (metrics.json has every reason):")
        for line in lines:
            console.print(line, highlight=False, markup=False)


def print_summary(console: Console, path: Path, rows: list[dict[str, Any]]) -> None:
    last = rows[-1]
    privacy = json.loads((path / "privacy.json").read_text())
    print_failures(console, rows)
    console.print(
        f"final accuracy {fmt(last['accuracy'])} after {last['round']} rounds; "
        f"max client epsilon {fmt(last['epsilon_max'], 3)}."
    )
    for cid, info in privacy["clients"].items():
        lifetime = info.get("lifetime_epsilon")
        console.print(
            f"  {cid}: epsilon {info['epsilon']:.3f} at delta {info['delta']:g} ({info['accountant'].upper()}) over "
            + _spending(info["ledger"])
            + (f"; lifetime epsilon of its data {lifetime:.3f}" if lifetime is not None else "")
        )
    if any(info.get("metrics") == "plain" for info in privacy["clients"].values()):
        console.print(f"  [bold red]WARNING: {privacy['metrics']}.[/]", highlight=False)
    secure = [row["secure_aggregation"] for row in rows if "secure_aggregation" in row]
    if secure:
        console.print(
            f"  secure aggregation (SecAgg+): the server saw only sums; {sum(s['updates_scaled'] for s in secure)} "
            f"updates scaled to the range, {sum(s['values_clipped'] for s in secure)} values clipped."
        )
    client_level = privacy.get("client_level")
    if client_level:
        console.print(
            f"  client level ({client_level['mechanism']}): epsilon {fmt(client_level['epsilon'], 3)} at delta "
            f"{client_level['delta']:g} over {len(client_level['released_rounds'])} released rounds, noise "
            f"multiplier {client_level['noise_multiplier']:g} (RDP, no sampling amplification)"
        )
    console.print(
        f"encrypted model: {path / 'model.ftenc'}; metrics: {path / 'metrics.json'}, plot: {path / 'training.png'}"
    )
    console.print(f"to decrypt it: fedtrain export {path} --out model.pt")
    print_report_and_tracking(console, path)


def print_report_and_tracking(console: Console, path: Path) -> None:
    """Where the run's report is (or how to write one), and where it was tracked."""
    from fedtrain.config import load_toml
    from fedtrain.errors import FedtrainError
    from fedtrain.server.tracking import mlflow_store, tensorboard_events

    report = path / "report.html"
    console.print(
        f"privacy card and report for whoever signs the run off: {report}"
        if report.is_file()
        else f"privacy card and report for whoever signs the run off: fedtrain report {path}",
        highlight=False,
        markup=False,
    )
    try:
        config = load_toml(path / "config.toml")
    except FedtrainError:
        return
    track = config.get("track") or []
    if "mlflow" in track:
        uri = mlflow_store.tracking_uri(config.get("mlflow_uri"))
        console.print(f"MLflow: run {path.name} in experiment {mlflow_store.EXPERIMENT!r} of {uri} (mlflow ui "
                      f"--backend-store-uri {uri})", highlight=False, markup=False)  # fmt: skip
    if "tensorboard" in track:
        console.print(f"TensorBoard: tensorboard --logdir {path / tensorboard_events.FOLDER}", highlight=False,
                      markup=False)  # fmt: skip


def _spending(ledger: list[dict[str, Any]]) -> str:
    """What a client's ledger holds, in words."""
    kinds = [e.get("kind", "train") for e in ledger]
    training = [e for e, kind in zip(ledger, kinds, strict=True) if kind == "train"]
    words = (
        f"{len(training)} rounds, {sum(e['steps'] for e in training)} DP-SGD steps and "
        f"{kinds.count('metrics')} metric releases"
    )
    tunings = [e for e, kind in zip(ledger, kinds, strict=True) if kind == "tuning"]
    if tunings:
        each = ", ".join(str(e["steps"]) for e in tunings)
        words = f"a private tuning (the best of a secret number of trials of {each} DP-SGD steps each)" + (
            f" and {words}" if len(tunings) < len(ledger) else ""
        )
    return words


def print_audit(console: Console, found: Any) -> None:
    """`fedtrain audit`'s lines: the bound, how it was found, and the accounted epsilon beside it.

    `found` is an AuditResult (fedtrain/audit/run.py; not imported here, which would load torch)."""
    console.print(
        f"audit of {found.client}: {found.m} {found.kind} canaries, each included with probability 1/2; "
        f"{found.best.guesses} guesses, {found.best.correct} correct",
        highlight=False,
    )
    console.print(
        f"  epsilon_lower {found.epsilon_lower:.3f} at {found.confidence:.0%} confidence (delta {found.delta:g}), "
        f"beside the accounted epsilon {found.epsilon:.3f} ({found.accountant.upper()})",
        highlight=False,
    )
    if not found.broken:
        console.print(f"{found.verdict()}; a lower bound from one attack, not a guarantee.", highlight=False)
