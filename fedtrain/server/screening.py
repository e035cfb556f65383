"""Sort train replies into accepted updates, refusals and failures, before any aggregation.

An update is accepted only if it has exactly the global model's tensors, shapes and dtypes, every
value is finite and (when max_update_norm is set) its L2 norm is within the bound; anything else is
a failure with a reason, and never reaches the model. A client's refusal (its policy, or its budget)
is kept with its reason; a client's error reply carries only a category.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedtrain import protocol
from fedtrain.compression import from_content
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.security.payload import array_view


@dataclass
class ClientPrivacy:
    """What a client last told the server about its privacy spending in this run."""

    delta: float
    ledger: PrivacyLedger
    epsilon: float
    lifetime_epsilon: float | None = None
    metrics: str = "private"

    @classmethod
    def of(cls, report: protocol.PrivacyReport) -> ClientPrivacy:
        return cls(report.ledger.delta, report.ledger, report.epsilon, report.lifetime_epsilon, report.metrics)


class ReleasedMean:
    """The example-weighted mean of clients' released metrics, and the standard deviation of its noise
    (each client's noise is independent: sqrt(sum (n_i sd_i)^2) / sum n_i)."""

    def __init__(self) -> None:
        self.weight, self.total, self.variance = 0.0, 0.0, 0.0

    def add(self, metrics: Any, key: str) -> None:
        if key not in metrics:
            return
        count = float(metrics[protocol.NUM_EXAMPLES])
        self.weight += count
        self.total += count * float(metrics[key])
        self.variance += (count * float(metrics.get(key + protocol.STD, 0.0))) ** 2

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight else float("nan")

    @property
    def std(self) -> float:
        return self.variance**0.5 / self.weight if self.weight else float("nan")


@dataclass
class Screened:
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, ClientPrivacy] = field(default_factory=dict)
    refused_by_policy: set[str] = field(default_factory=set)  # refusals of the run itself, not of a spent budget
    train_loss: ReleasedMean = field(default_factory=lambda: ReleasedMean())
    bytes_up: dict[str, int] = field(default_factory=dict)  # each update reply's content, as it travelled
    update_bytes: dict[str, int] = field(default_factory=dict)  # of which its update (packed, when compressed)
    # train replies that evaluated the global model first: what each client released, as evaluate metrics
    evaluations: dict[str, protocol.Metrics] = field(default_factory=dict)


def _name(client: str, node: int, known: dict[int, str]) -> str:
    """The client's own name (from its reply), remembered per node for its later error replies."""
    if client:
        known[node] = client
    return known.get(node, f"node-{node}")


def error_reason(msg: Message) -> str:
    """One line from a Flower error reply (the SuperLink's own, e.g. a node that stopped sending
    heartbeats): its message, without wrapping."""
    lines = [line.strip() for line in (msg.error.reason or "").splitlines() if line.strip()]
    last = lines[-1] if lines else "client error"
    if "Message: " in last:
        last = last.split("Message: ", 1)[1]
    return last.rstrip("'>").strip() or "client error"


CHECK_CHUNK = 1 << 18  # values checked at a time: temporaries stay about 2 MB whatever the update's size


def _check_update(
    update: ArrayRecord | dict[str, np.ndarray], global_arrays: dict[str, np.ndarray], max_norm: float | None = None
) -> tuple[str | None, dict[str, np.ndarray]]:
    """(what is wrong with the update or None, its tensors as arrays).

    A plain update's tensors are numpy views of the reply's bytes, not copies, and its values are
    checked a chunk at a time: screening an update of hundreds of MB takes a few MB beyond the reply."""
    if set(update.keys()) != set(global_arrays):
        return "its update has different tensors than the global model", {}
    squares, decoded = 0.0, {}
    for name, array in update.items():
        try:
            value = array if isinstance(array, np.ndarray) else array_view(array)
        except ValueError as exc:
            return f"tensor {name} is malformed ({exc})", {}
        reference = global_arrays[name]
        decoded[name] = value
        if value.shape != reference.shape or value.dtype != reference.dtype:
            problem = (
                f"tensor {name} has shape {value.shape}/{value.dtype}, expected {reference.shape}/{reference.dtype}"
            )
            return problem, {}
        if np.issubdtype(value.dtype, np.floating):
            flat = value.reshape(-1)
            for start in range(0, flat.size, CHECK_CHUNK):
                part = flat[start : start + CHECK_CHUNK]
                if not np.isfinite(part).all():
                    return f"tensor {name} contains NaN or infinite values", {}
                squares += float(np.sum(np.square(part, dtype=np.float64)))
    if max_norm is not None and squares**0.5 > max_norm:
        return f"its L2 norm {squares**0.5:.4g} exceeds max_update_norm = {max_norm:g}", {}
    return None, decoded


def read(msg: Message, node: int, known: dict[int, str], out: Screened) -> protocol.Reply | None:
    """Parse one reply into `out` (its privacy record, a refusal or a failure); the parsed reply when
    it still needs looking at (an update or metrics), else None."""
    if msg.has_error():
        out.failed[_name("", node, known)] = error_reason(msg)
        return None
    try:
        reply = protocol.read_reply(msg)
    except Exception as exc:  # a malformed reply is that client's failure, not the run's
        out.failed[_name("", node, known)] = f"unreadable reply ({type(exc).__name__}: {exc})"
        return None
    name = _name(reply.client, node, known)
    if reply.privacy is not None:
        out.privacy[name] = ClientPrivacy.of(reply.privacy)
    evaluation = protocol.evaluation_of(reply)
    if evaluation is not None:  # it left the client (and is on its ledger) whatever became of the training
        out.evaluations[name] = evaluation
    if reply.kind == "error":
        out.failed[name] = f"client error ({reply.reason})"
        return None
    if reply.kind == "refused":
        out.refused[name] = reply.reason
        if reply.refusal_kind == protocol.POLICY:
            out.refused_by_policy.add(name)
        return None
    return reply


def screen_reply(
    msg: Message,
    global_arrays: dict[str, np.ndarray],
    known: dict[int, str],
    node_of: Callable[[Message], int],
    max_update_norm: float | None,
    out: Screened,
) -> dict[str, np.ndarray] | None:
    """Sort one reply into `out` (its ledger, a refusal or a failure); the update d, decoded, when
    it is accepted (the caller decides what becomes of it)."""
    reply = read(msg, node_of(msg), known, out)
    if reply is None:
        return None
    name = _name(reply.client, node_of(msg), known)
    content = msg.content
    if reply.kind != "update" or list(content.array_records) != [protocol.ARRAYS] or len(content.metric_records) != 1:
        out.failed[name] = "reply does not hold exactly one update and one set of metrics"
        return None
    out.bytes_up[name] = protocol.content_bytes(content)
    out.update_bytes[name] = sum(len(a.data) for a in content.array_records[protocol.ARRAYS].values())
    metrics = content.metric_records[protocol.METRICS]
    try:
        decoded = from_content(content, global_arrays)  # a compressed update, decoded; None: a plain one
    except ValueError as exc:
        out.failed[name] = f"rejected update: malformed compressed update ({exc})"
        return None
    arrays = decoded if decoded is not None else content.array_records[protocol.ARRAYS]
    problem, update = _check_update(arrays, global_arrays, max_update_norm)
    examples = metrics.get(protocol.NUM_EXAMPLES)
    if problem is None and (not isinstance(examples, (int, float)) or not examples > 0):
        problem = "it reports no training examples"
    if problem:
        out.failed[name] = f"rejected update: {problem}"
        return None
    for key in [k for k in metrics if k == protocol.HELD_OUT_EXAMPLES or k.startswith(protocol.EVAL)]:
        del metrics[key]  # the evaluation was read above: the strategy aggregates training metrics only
    metrics[protocol.UNIT_WEIGHT] = 1  # lets a strategy take a uniform mean, as client-level DP needs
    out.train_loss.add(metrics, protocol.TRAIN_LOSS)
    return update
