"""The training part of a report in numbers: refusals and failures grouped by reason, time per round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtrain.server.plots import value


@dataclass
class Missing:
    """Clients that refused or failed, for one reason, over the whole run."""

    kind: str  # "refused" or "failed"
    reason: str
    clients: list[str] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    count: int = 0  # client-rounds


def missing_by_reason(rows: list[dict[str, Any]]) -> list[Missing]:
    """Every refusal and failure of the run, grouped by kind and reason, most frequent first."""
    groups: dict[tuple[str, str], Missing] = {}
    for row in rows:
        for kind in ("refused", "failed"):
            for client, reason in sorted((row.get(kind) or {}).items()):
                group = groups.setdefault((kind, str(reason)), Missing(kind, str(reason)))
                group.count += 1
                if client not in group.clients:
                    group.clients.append(client)
                if row["round"] not in group.rounds:
                    group.rounds.append(row["round"])
    return sorted(groups.values(), key=lambda g: (-g.count, g.kind, g.reason))


@dataclass
class Timing:
    total: float
    first: float
    median_after_first: float | None
    slowest_round: int


def timing(rows: list[dict[str, Any]]) -> Timing:
    """Seconds in all, of the first round (it includes starting the clients) and of a typical later one."""
    seconds = [value(row, "seconds") for row in rows]
    seconds = [s if s == s else 0.0 for s in seconds]  # NaN (missing) counts as 0
    later = sorted(seconds[1:])
    median = later[len(later) // 2] if later else None
    slowest = max(range(len(rows)), key=lambda i: seconds[i])
    return Timing(sum(seconds), seconds[0], median, int(rows[slowest]["round"]))


def rounds_ranges(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
