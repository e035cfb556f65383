"""Sort train replies into accepted updates, refusals and failures, before any aggregation.

An update is accepted only if it has exactly the global model's tensors, shapes and dtypes, every
value is finite and (when max_update_norm is set) its L2 norm is within the bound; anything else is
a failure with a reason, and never reaches the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtrain.clients.ledger import PrivacyLedger
from fedtrain.strategies.central_dp import UNIT_WEIGHT


@dataclass
class ClientPrivacy:
    """What a client last told the server about its privacy spending."""

    delta: float
    ledger: PrivacyLedger
    epsilon: float


@dataclass
class Screened:
    accepted: list[Message] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, ClientPrivacy] = field(default_factory=dict)


def _name(msg: Message, node: int, known: dict[int, str]) -> str:
    """The client's own name (from its privacy record), remembered per node for its error replies."""
    content = None if msg.has_error() else msg.content
    if content is not None and "privacy" in content.config_records:
        known[node] = str(content.config_records["privacy"].get("client-id", f"node-{node}"))
    return known.get(node, f"node-{node}")


def error_reason(msg: Message) -> str:
    """One line from a Flower error reply: the exception's own message, without wrapping."""
    lines = [line.strip() for line in (msg.error.reason or "").splitlines() if line.strip()]
    last = lines[-1] if lines else "client error"
    if "Message: " in last:
        last = last.split("Message: ", 1)[1]
    return last.rstrip("'>").strip() or "client error"


def _check_update(
    update: ArrayRecord, global_arrays: dict[str, np.ndarray], max_norm: float | None = None
) -> tuple[str | None, dict[str, np.ndarray]]:
    """(what is wrong with the update or None, its tensors decoded once)."""
    if set(update.keys()) != set(global_arrays):
        return "its update has different tensors than the global model", {}
    squares, decoded = 0.0, {}
    for name, array in update.items():
        value, reference = array.numpy(), global_arrays[name]
        decoded[name] = value
        if value.shape != reference.shape or value.dtype != reference.dtype:
            problem = (
                f"tensor {name} has shape {value.shape}/{value.dtype}, expected {reference.shape}/{reference.dtype}"
            )
            return problem, {}
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                return f"tensor {name} contains NaN or infinite values", {}
            squares += float(np.sum(np.square(value, dtype=np.float64)))
    if max_norm is not None and squares**0.5 > max_norm:
        return f"its L2 norm {squares**0.5:.4g} exceeds max_update_norm = {max_norm:g}", {}
    return None, decoded


def _read_privacy(msg: Message, name: str, out: Screened) -> bool:
    """Record the reply's ledger; True when the reply is settled here (an error, a refusal, or an
    unreadable ledger) and carries no update to look at."""
    if msg.has_error():
        out.failed[name] = error_reason(msg)
        return True
    privacy = msg.content.config_records.get("privacy")
    if privacy is None:
        return False
    try:
        ledger = PrivacyLedger.from_config_record(privacy)
        out.privacy[name] = ClientPrivacy(ledger.delta, ledger, float(privacy["epsilon"]))
    except Exception as exc:  # a malformed ledger is that client's failure, not the run's
        out.failed[name] = f"unreadable privacy ledger ({exc})"
        return True
    if "refused" in privacy:
        out.refused[name] = str(privacy["refused"])
        return True
    return False


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
    name = _name(msg, node_of(msg), known)
    if _read_privacy(msg, name, out):
        return None
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        out.failed[name] = "reply does not hold exactly one update and one set of metrics"
        return None
    metrics = next(iter(content.metric_records.values()))
    problem, update = _check_update(next(iter(content.array_records.values())), global_arrays, max_update_norm)
    examples = metrics.get("num-examples")
    if problem is None and (not isinstance(examples, (int, float)) or not examples > 0):
        problem = "it reports no training examples"
    if problem:
        out.failed[name] = f"rejected update: {problem}"
        return None
    metrics[UNIT_WEIGHT] = 1  # lets a strategy take a uniform mean, as client-level DP needs
    return update


def screen(
    replies: list[Message],
    global_arrays: dict[str, np.ndarray],
    known: dict[int, str],
    node_of: Callable[[Message], int] = lambda msg: msg.metadata.src_node_id,
    max_update_norm: float | None = None,
) -> Screened:
    """Accepted replies come back holding client *weights* w_t + d, ready for a Flower strategy.

    `known` maps node ids to client names; it is updated from the replies. `node_of` says which
    node a reply answers for (the SuperLink itself sends the error reply of a node that died)."""
    out = Screened()
    for msg in replies:
        update = screen_reply(msg, global_arrays, known, node_of, max_update_norm, out)
        if update is None:
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        weights = ArrayRecord({k: Array(global_arrays[k] + update[k]) for k in global_arrays})
        msg.content = RecordDict({"arrays": weights, "metrics": metrics})  # what Flower strategies expect
        out.accepted.append(msg)
    return out


def screen_masked(replies: list[Message], known: dict[int, str], node_of: Callable[[Message], int]) -> Screened:
    """Secure aggregation's masked-vector replies: the server can read each client's ledger and
    metrics, never its update. `accepted` holds the replies whose update is in the masked sum."""
    out = Screened()
    for msg in replies:
        if not _read_privacy(msg, _name(msg, node_of(msg), known), out):
            out.accepted.append(msg)
    return out
