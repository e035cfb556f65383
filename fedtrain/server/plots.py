"""Charts of a run's rounds (rows of metrics.json), drawn with matplotlib's object API (no pyplot
state, so any thread may draw): the run directory's training.png and the figures of the run report.

Every round axis has integer ticks. A row may come from the loop (NaN where a metric is missing)
or from metrics.json (null there); both read as "no value".
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CENTRAL, FEDERATED, TRAIN, EPSILON_MAX, CLIENT_LEVEL = "#1f5fa8", "#d9822b", "#6a6a6a", "#b3261e", "#222222"
MAX_LEGEND_CLIENTS = 10  # beyond this many clients, one line each but no legend entry each
BAND_AT_MOST = 0.25  # the federated noise band is drawn while one sd is at most this share of the metric's range
UNIT_METRICS = ("accuracy", "f1", "precision", "recall", "auc", "balanced_accuracy")  # shown on [0, 1]


def value(row: dict[str, Any], key: str) -> float:
    """A row's number, NaN when it is missing, null or not a number."""
    item = row.get(key)
    return float(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else math.nan


def headline(rows: list[dict[str, Any]]) -> str:
    """The name of the metric a row's `accuracy` holds (the task's headline metric)."""
    return str(rows[-1].get("metric") or "accuracy") if rows else "accuracy"


def clients(rows: list[dict[str, Any]]) -> list[str]:
    """Every client that reported an epsilon in any round, sorted."""
    return sorted({cid for row in rows for cid in (row.get("epsilon") or {})})


def _rounds_axis(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Rounds on x: whole numbers only, and no round 0 or past the last."""
    axis.set_xlabel("round")
    rounds = [row["round"] for row in rows]
    if rounds:
        axis.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axis.grid(True, alpha=0.3)


def _unit_range(axis: Any, name: str, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if name in UNIT_METRICS and finite and min(finite) >= 0.0 and max(finite) <= 1.0:
        axis.set_ylim(0, 1.02)


def draw_metric(axis: Any, rows: list[dict[str, Any]]) -> None:
    """The headline metric per round: central (the server's test split) and federated (the clients'
    held-out splits, with a band of one noise standard deviation where it was released privately)."""
    name = headline(rows)
    rounds = [row["round"] for row in rows]
    central = [value(row, "accuracy") for row in rows]
    federated = [value(row, "federated_accuracy") for row in rows]
    spread = [value(row, "federated_accuracy_std") for row in rows]
    if any(math.isfinite(v) for v in federated):
        noise = sorted(s for s in spread if math.isfinite(s))
        typical = noise[len(noise) // 2] if noise else 0.0
        finite = [v for v in central + federated if math.isfinite(v)]
        scale = (max(finite) - min(finite)) or 1.0 if name not in UNIT_METRICS else 1.0
        label = "federated (clients' data)" + (f", noise sd {typical:.2g}" if typical else "")
        axis.plot(rounds, federated, marker=".", linestyle="--", color=FEDERATED, label=label)
        if 0 < typical <= BAND_AT_MOST * scale:  # a band wider than this would only cover the chart
            low = [f - s if math.isfinite(s) else f for f, s in zip(federated, spread, strict=True)]
            high = [f + s if math.isfinite(s) else f for f, s in zip(federated, spread, strict=True)]
            axis.fill_between(rounds, low, high, color=FEDERATED, alpha=0.15, linewidth=0)
    shows_central = any(math.isfinite(v) for v in central) and central != federated
    if shows_central:
        axis.plot(rounds, central, marker="o", markersize=3, color=CENTRAL, label="central (test split)")
    axis.set_ylabel(name)
    axis.set_title(f"{name} per round")
    _rounds_axis(axis, rows)
    _unit_range(axis, name, central + federated)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="best", fontsize="small")


def draw_loss(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Loss per round: central, federated and the clients' train loss (as released)."""
    rounds = [row["round"] for row in rows]
    for key, label, color, style in (
        ("loss", "central (test split)", CENTRAL, "-"),
        ("federated_loss", "federated (clients' data)", FEDERATED, "--"),
        ("train_loss", "train (clients' data)", TRAIN, ":"),
    ):
        series = [value(row, key) for row in rows]
        if any(math.isfinite(v) for v in series) and not (key == "loss" and _same(rows, "loss", "federated_loss")):
            axis.plot(rounds, series, marker=".", linestyle=style, color=color, label=label)
    axis.set_ylabel("loss")
    axis.set_title("loss per round")
    _rounds_axis(axis, rows)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="best", fontsize="small")


def _same(rows: list[dict[str, Any]], a: str, b: str) -> bool:
    """A deployment has no central test split: its `loss` is the federated loss, drawn once."""
    return all(value(row, a) == value(row, b) or not math.isfinite(value(row, a)) for row in rows)


def draw_client_epsilon(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Each client's epsilon (this run) after every round, and client-level epsilon where it ran."""
    rounds = [row["round"] for row in rows]
    names = clients(rows)
    many = len(names) > MAX_LEGEND_CLIENTS  # then grey lines, one legend entry for them all
    for index, cid in enumerate(names):
        series = [value(row.get("epsilon") or {}, cid) for row in rows]
        if many:
            axis.plot(
                rounds, series, linewidth=0.8, color=TRAIN, alpha=0.6, label="each client" if index == 0 else None
            )
        else:
            axis.plot(rounds, series, marker=".", linewidth=1.2, label=cid)
    client_level = [value(row, "client_epsilon") for row in rows]
    if any(math.isfinite(v) for v in client_level):
        axis.plot(rounds, client_level, linestyle="--", color=CLIENT_LEVEL, label="client-level (server)")
    axis.set_ylabel("epsilon spent")
    axis.set_title("privacy spent by each client")
    axis.set_ylim(bottom=0)
    _rounds_axis(axis, rows)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", fontsize="small", ncol=2 if len(names) > 5 else 1)


def draw_metric_vs_epsilon(axis: Any, rows: list[dict[str, Any]]) -> None:
    """The headline metric against the largest client epsilon spent so far: what privacy bought."""
    name = headline(rows)
    spent = [value(row, "epsilon_max") for row in rows]
    metric = [value(row, "accuracy") for row in rows]
    axis.plot(spent, metric, marker="o", markersize=3, color=EPSILON_MAX)
    labelled = {0, len(rows) - 1, *range(0, len(rows), max(1, len(rows) // 5))}
    for index in sorted(labelled):
        if index < len(rows) and math.isfinite(spent[index]) and math.isfinite(metric[index]):
            axis.annotate(
                f"r{rows[index]['round']}",
                (spent[index], metric[index]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize="small",
                color="#555555",
            )
    finite = [e for e in spent if math.isfinite(e)]
    axis.set_xlim(0, max(finite) * 1.1 if finite and max(finite) > 0 else 1.0)  # room for the last label
    axis.set_xlabel("largest client epsilon spent")
    axis.set_ylabel(name)
    axis.set_title(f"{name} against privacy spent")
    axis.grid(True, alpha=0.3)
    _unit_range(axis, name, metric)


def draw_participation(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Clients per round: usable updates, refusals and failures, stacked."""
    rounds = [row["round"] for row in rows]
    ok = [value(row, "clients_ok") for row in rows]
    refused = [value(row, "clients_refused") for row in rows]
    failed = [value(row, "clients_failed") for row in rows]
    axis.bar(rounds, ok, color="#3c8d5a", label="usable update")
    axis.bar(rounds, refused, bottom=ok, color="#d9a62b", label="refused")
    axis.bar(
        rounds, failed, bottom=[a + b for a, b in zip(ok, refused, strict=True)], color=EPSILON_MAX, label="failed"
    )
    totals = [a + b + c for a, b, c in zip(ok, refused, failed, strict=True) if math.isfinite(a + b + c)]
    axis.set_ylim(0, max(totals, default=1) * 1.3)  # room for the legend above the bars
    axis.set_ylabel("clients")
    axis.set_title("clients per round")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    _rounds_axis(axis, rows)
    axis.legend(loc="upper center", fontsize="small", ncol=3)


def draw_seconds(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Wall-clock seconds of each round (the first includes starting the clients)."""
    axis.bar([row["round"] for row in rows], [value(row, "seconds") for row in rows], color=CENTRAL)
    axis.set_ylabel("seconds")
    axis.set_title("time per round")
    _rounds_axis(axis, rows)


def figure(draw: Any, rows: list[dict[str, Any]], size: tuple[float, float] = (6.4, 3.4)) -> Figure:
    """One chart (`draw(axis, rows)`) on its own figure."""
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    draw(fig.add_subplot(), rows)
    return fig


def training_figure(rows: list[dict[str, Any]]) -> Figure:
    """training.png: the headline metric per round, each client's epsilon per round, and the metric
    against the epsilon spent."""
    fig = Figure(figsize=(15, 4), dpi=100, layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    draw_metric(left, rows)
    draw_client_epsilon(middle, rows)
    draw_metric_vs_epsilon(right, rows)
    fig.suptitle("fedtrain: what the model learned, and the privacy it cost")
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def svg(fig: Figure) -> str:
    """The figure as an inline <svg> element: text kept as text, and nothing that points outside
    the document (no XML prolog, DOCTYPE, metadata or namespace URLs; references are #ids)."""
    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = text.replace("xlink:href=", "href=")
    return text.strip()
