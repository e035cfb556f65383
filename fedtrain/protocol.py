"""The one place the server and the clients meet: record names, and the build and parse of every
message fedtrain's apps exchange (besides Flower's own: SecAgg+ stages, its legacy records).

Server -> client (train and evaluate): "arrays" (global weights) and "config" (fedtrain's run id,
FedProx's mu; in a train message, whether to evaluate the global model first). Client -> server, one of:
- an update: "arrays" (d = w_local - w_global), "metrics" (count, released metrics; with the held-out
  count and released evaluation metrics when it evaluated first), "privacy";
- evaluation metrics: "metrics" (count, released metrics), "privacy";
- a refusal: "privacy" with the reason (policy or budget) in words built from public numbers only;
- an error: "status" holding a category, never the exception's text (it stays in the client's log).

`REPLY_FIELDS` says what covers every field a client sends; docs/privacy.md has the same table and
tests/test_reply_fields.py checks every reply of a default client against it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger

# ---------------------------------------------------------------- record names
ARRAYS, METRICS, PRIVACY, CONFIG, STATUS = "arrays", "metrics", "privacy", "config", "status"
COMPRESSION = "compression"  # client -> server, beside a compressed update: its mode, block size, tensors

# server -> client, in CONFIG
RUN_ID, PROXIMAL_MU = "fedtrain-run", "proximal-mu"
# in a train message: first evaluate the global model it carries on the held-out split (one release, as an
# evaluate message would cost), then train; one reply carries both (server/federated_evaluation.py)
EVALUATE_FIRST = "fedtrain-evaluate-first"

# client -> server, in METRICS
NUM_EXAMPLES = "num-examples"
HELD_OUT_EXAMPLES = "held-out-examples"  # a train reply that evaluated first: the held-out count (public)
TRAIN_LOSS = "train-loss"
EVAL = "eval-"  # prefix: eval-<value>, the released mean of one of the task's per-example values
EVAL_LOSS, EVAL_ACCURACY = "eval-loss", "eval-accuracy"  # classification's two values
STD = "-std"  # suffix: the noise's standard deviation on a released metric
SECAGG_SCALED, SECAGG_CLIPPED = "secagg-scaled", "secagg-clipped-values"
UNIT_WEIGHT = "unit-weight"  # set by the server's screening (never by a client): uniform means

# client -> server, in PRIVACY
CLIENT_ID, EPSILON, LIFETIME_EPSILON, METRICS_MODE = "client-id", "epsilon", "lifetime-epsilon", "metrics"
REFUSED, REFUSAL_KIND = "refused", "refusal-kind"
ACCOUNTANT, DELTA, KIND, SIGMA, RATE, STEPS = "accountant", "delta", "kind", "noise-multiplier", "sample-rate", "steps"
TRIALS_ETA, TRIALS_GAMMA = "trials-eta", "trials-gamma"  # a "tuning" entry's trial count (0 for others)
LEDGER_COLUMNS = (KIND, SIGMA, RATE, STEPS, TRIALS_ETA, TRIALS_GAMMA)

# client -> server, in STATUS
ERROR = "error"

POLICY, BUDGET = "policy", "budget"  # refusal kinds: the run breaks the client's policy / its budget is spent
ERROR_CATEGORIES = (
    "data error",
    "model mismatch",
    "ledger error",
    "policy error",
    "decryption error",
    "protocol error",
    "internal error",
)

# What covers each field a client sends. "dp-sgd": the update's noise (a "train" ledger entry);
# "gaussian": a metric release (a "metrics" ledger entry); "public": a count or a function of public
# parameters and the client's own policy; "outside": exact values, only under metrics = "plain".
REPLY_FIELDS: dict[tuple[str, str], str] = {
    (ARRAYS, "*"): "dp-sgd",
    (METRICS, NUM_EXAMPLES): "public",
    (METRICS, HELD_OUT_EXAMPLES): "public",
    (METRICS, TRAIN_LOSS): "gaussian",
    (METRICS, TRAIN_LOSS + STD): "public",
    (METRICS, EVAL + "*" + STD): "public",
    (METRICS, EVAL + "*"): "gaussian",  # every value of the task: eval-loss, eval-accuracy, eval-abs_error...
    (METRICS, SECAGG_SCALED): "dp-sgd",
    (METRICS, SECAGG_CLIPPED): "dp-sgd",
    **{
        (PRIVACY, name): "public"
        for name in (
            CLIENT_ID,
            EPSILON,
            LIFETIME_EPSILON,
            METRICS_MODE,
            REFUSED,
            REFUSAL_KIND,
            ACCOUNTANT,
            DELTA,
            *LEDGER_COLUMNS,
        )
    },
    (STATUS, ERROR): "public",
    (STATUS, CLIENT_ID): "public",
    # how a compressed update is packed: the run's settings and the tensor names (fedtrain/compression.py)
    (COMPRESSION, "*"): "public",
}


def cover(record: str, key: str) -> str | None:
    """What covers field `key` of record `record` (REPLY_FIELDS, first matching pattern), or None."""
    for (name, pattern), what in REPLY_FIELDS.items():
        if name == record and fnmatch.fnmatchcase(key, pattern):
            return what
    return None


def eval_key(value: str) -> str:
    return EVAL + value


# ---------------------------------------------------------------- record values

Metrics = dict[str, int | float | list[int] | list[float]]  # what a client's metrics record holds


def number(value: object) -> float:
    """A record value that must be a number; raises ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def values(value: object) -> list:
    """A record value that must be a list; raises ValueError for anything else."""
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list")
    return value


# ---------------------------------------------------------------- the privacy record


@dataclass
class PrivacyReport:
    """What a client tells the server about its spending in this run."""

    client: str
    ledger: PrivacyLedger
    epsilon: float
    lifetime_epsilon: float | None = None
    metrics: str = "private"


def privacy_record(report: PrivacyReport) -> ConfigRecord:
    entries = report.ledger.entries
    record = ConfigRecord(
        {
            CLIENT_ID: report.client,
            ACCOUNTANT: report.ledger.accountant,
            DELTA: report.ledger.delta,
            KIND: [e.kind for e in entries],
            SIGMA: [e.noise_multiplier for e in entries],
            RATE: [e.sample_rate for e in entries],
            STEPS: [e.steps for e in entries],
            TRIALS_ETA: [float(e.eta or 0.0) for e in entries],
            TRIALS_GAMMA: [float(e.gamma or 0.0) for e in entries],
            EPSILON: report.epsilon,
            METRICS_MODE: report.metrics,
        }
    )
    if report.lifetime_epsilon is not None:
        record[LIFETIME_EPSILON] = report.lifetime_epsilon
    return record


def read_privacy(record: ConfigRecord) -> PrivacyReport:
    """Parse a privacy record; raises ValueError when it is malformed."""
    columns = [values(record.get(name, [])) for name in LEDGER_COLUMNS]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("ledger columns of different lengths")
    entries = [
        LedgerEntry.from_dict({"kind": k, "noise_multiplier": s, "sample_rate": q, "steps": n, "eta": e, "gamma": g})
        for k, s, q, n, e, g in zip(*columns, strict=True)
    ]
    ledger = PrivacyLedger.from_dict({"accountant": record.get(ACCOUNTANT, "prv"), "delta": record[DELTA]})
    ledger.entries = entries
    eps = number(record[EPSILON])
    lifetime = record.get(LIFETIME_EPSILON)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"epsilon {eps} is not a finite, non-negative number")
    return PrivacyReport(
        str(record.get(CLIENT_ID, "")),
        ledger,
        eps,
        None if lifetime is None else number(lifetime),
        str(record.get(METRICS_MODE, "private")),
    )


# ---------------------------------------------------------------- client replies


def update_reply(
    msg: Message,
    update: ArrayRecord,
    metrics: Metrics,
    report: PrivacyReport,
    compression: ConfigRecord | None = None,
) -> Message:
    """A train reply: the update d (packed, with its `compression` record, when compressed), the public
    count and released metrics, the privacy record."""
    content = RecordDict({ARRAYS: update, METRICS: MetricRecord(metrics), PRIVACY: privacy_record(report)})
    if compression is not None:
        content[COMPRESSION] = compression
    return Message(content, reply_to=msg)


def content_bytes(content: RecordDict) -> int:
    """Bytes a message's content takes on the wire: every array's serialised data, plus the other
    records serialised as Flower serialises them (the arrays are not serialised again to count them)."""
    from flwr.common.serde import recorddict_to_proto

    arrays = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    rest = RecordDict({**content.metric_records, **content.config_records})
    return arrays + recorddict_to_proto(rest).ByteSize()


def metrics_reply(msg: Message, metrics: Metrics, report: PrivacyReport | None) -> Message:
    """An evaluate reply: the public count and the released metrics (and the ledger that paid for them)."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if report is not None:
        content[PRIVACY] = privacy_record(report)
    return Message(content, reply_to=msg)


def refusal_reply(
    msg: Message, reason: str, kind: str, report: PrivacyReport | None, client: str, metrics: Metrics | None = None
) -> Message:
    """The client refuses this message: its reason (public numbers and its own policy only); `metrics`:
    what it released before refusing (a train message's evaluation, when only the training is refused)."""
    record = privacy_record(report) if report is not None else ConfigRecord({CLIENT_ID: client})
    record[REFUSED], record[REFUSAL_KIND] = reason, kind
    content = RecordDict({PRIVACY: record})
    if metrics:
        content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def error_reply(msg: Message, category: str, client: str) -> Message:
    """A failure, as a category only: nothing of the exception (paths, values) leaves the client."""
    if category not in ERROR_CATEGORIES:
        category = "internal error"
    return Message(RecordDict({STATUS: ConfigRecord({ERROR: category, CLIENT_ID: client})}), reply_to=msg)


@dataclass
class Reply:
    """A client's reply as the server reads it."""

    kind: str  # "update" | "metrics" | "refused" | "error"
    client: str = ""
    privacy: PrivacyReport | None = None
    reason: str = ""  # the refusal's reason or the error's category
    refusal_kind: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def read_reply(msg: Message) -> Reply:
    """Parse a client's reply (not a Flower error reply); raises ValueError when it is malformed."""
    content = msg.content
    if STATUS in content.config_records:
        status = content.config_records[STATUS]
        return Reply("error", str(status.get(CLIENT_ID, "")), reason=str(status.get(ERROR, "internal error")))
    privacy = content.config_records.get(PRIVACY)
    metrics = content.metric_records.get(METRICS)
    values = dict(metrics) if metrics is not None else {}
    if privacy is not None and REFUSED in privacy:
        report = read_privacy(privacy) if DELTA in privacy else None
        return Reply(
            "refused",
            str(privacy.get(CLIENT_ID, "")),
            report,
            str(privacy[REFUSED]),
            str(privacy.get(REFUSAL_KIND, BUDGET)),
            metrics=values,
        )
    report = read_privacy(privacy) if privacy is not None else None
    kind = "update" if content.array_records else "metrics"
    return Reply(kind, report.client if report else "", report, metrics=values)


def evaluation_of(reply: Reply) -> Metrics | None:
    """What a train reply that evaluated first released, as an evaluate reply's metrics (the held-out
    count as its count, and the released eval-* values); None when it carries no evaluation."""
    metrics = reply.metrics
    if HELD_OUT_EXAMPLES not in metrics:
        return None
    return {NUM_EXAMPLES: metrics[HELD_OUT_EXAMPLES], **{k: v for k, v in metrics.items() if k.startswith(EVAL)}}


def global_arrays(msg: Message) -> ArrayRecord:
    """The global weights a server message carries."""
    return msg.content.array_records[ARRAYS]


def sent_config(msg: Message) -> ConfigRecord:
    """fedtrain's settings for this message (run id, FedProx's mu); empty when none were sent."""
    return msg.content.config_records.get(CONFIG, ConfigRecord())
