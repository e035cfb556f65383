"""The privacy card of a run, in plain words: what was protected and against whom, what each
client spent, what left the clients and under which guarantee, an audit's lower bound where one
ran, and what epsilon means for one person's record. Facts only (no HTML): server/report/page.py
lays them out.

Everything is read from the run's verified files (config.toml, privacy.json, metrics.json), so the
card says what this run did, not what fedtrain can do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedtrain.server.report.run_files import RunFiles


@dataclass
class Protection:
    """One line of "what was protected, and against whom"."""

    name: str
    on: bool
    status: str  # a few words: "on", "off", "always"...
    protects: str
    against: str


@dataclass
class ClientSpend:
    """One client's privacy spending, from privacy.json."""

    client: str
    accountant: str
    delta: float
    epsilon: float
    lifetime_epsilon: float | None
    metrics: str
    training_rounds: int
    steps: int
    releases: int
    tunings: int = 0  # private tunings (each the best of a secret number of trials; docs/privacy.md)


@dataclass
class Release:
    """One kind of thing that left the clients, and what covers it."""

    what: str
    guarantee: str
    covered: bool  # inside the differential-privacy guarantee (or public by construction)


@dataclass
class Audit:
    """An empirical lower bound on epsilon (`fedtrain audit`), as privacy.json records it."""

    scope: str  # "the run", or a client's name
    epsilon_lower: float
    details: dict[str, Any]


def _section(files: RunFiles, name: str) -> dict[str, Any]:
    return files.config.get(name, {})


def is_deployment(files: RunFiles) -> bool:
    """A run of `fedtrain server` (a kit: real clients on their own machines), not a simulation."""
    return bool(_section(files, "deployment").get("kit"))


def protections(files: RunFiles) -> list[Protection]:
    """What this run protected, and against whom, in the order a reader asks about it."""
    federation, privacy, deployment = (_section(files, s) for s in ("federation", "privacy", "deployment"))
    client_level = files.privacy.get("client_level")
    secure = bool(federation.get("secure_aggregation"))
    plain = [cid for cid, c in files.privacy.get("clients", {}).items() if c.get("metrics") == "plain"]
    items = [
        Protection(
            "Record-level differential privacy on every client (DP-SGD, Opacus)",
            True,
            "always on",
            "any one record (one person's data) in a client's dataset: the model and the metrics that left the "
            "client would be almost as likely without that record"
            + (f"; except the exact metrics of {', '.join(plain)}, which their policy let out" if plain else ""),
            "the server, the other clients, and anyone who later gets the model or the metrics",
        ),
        Protection(
            "Client-level differential privacy (on the server)",
            client_level is not None,
            f"on ({privacy.get('central_dp')} clipping)" if client_level is not None else "off",
            "whether a whole client took part at all"
            if client_level is not None
            else "nothing beyond the records: the model may reveal properties of a whole client's dataset",
            "whoever receives the final model; not the server, which adds this noise itself"
            if client_level is not None
            else "-",
        ),
        Protection(
            "Secure aggregation (SecAgg+)",
            secure,
            "on" if secure else "off",
            "each client's individual update: the server only learns the sum of all clients' updates"
            if secure
            else "nothing: the server saw each client's (noised) update",
            "the server" if secure else "-",
        ),
        Protection(
            "Encryption of the model on disk (AES-256-GCM)",
            True,
            "always on",
            f"the final model and every checkpoint; the key (id {files.info.get('key_id')}) is never stored "
            "beside them",
            "anyone who copies the run directory or the disk",
        ),
        _messages(deployment),
        Protection(
            "Integrity of the reports (HMAC-SHA256 under the run's model key)",
            True,
            "always on; verified for this report",
            "metrics.json, metrics.csv, privacy.json and training.png: an edit is detected",
            "anyone who edits an epsilon or an accuracy after the run",
        ),
    ]
    return items


def _messages(deployment: dict[str, Any]) -> Protection:
    if deployment.get("kit"):
        return Protection(
            "Encryption of every message",
            True,
            "on (TLS and end to end)",
            "the model, updates and metrics in transit: TLS on every connection, and each message sealed between "
            "the server's app and each client's app (AES-256-GCM)",
            "eavesdroppers on the network, and the relay (SuperLink) that forwards the messages",
        )
    if deployment.get("payload_encryption"):
        return Protection(
            "Encryption of every message",
            True,
            "on (end to end)",
            "every message sealed between the server's app and each client's app (AES-256-GCM), as in a deployment",
            "anyone reading the simulation's message store",
        )
    return Protection(
        "Encryption of every message",
        False,
        "not needed: a simulation",
        "nothing: this was a simulation on one machine, so no message left it",
        "-",
    )


def client_spending(files: RunFiles) -> list[ClientSpend]:
    """Every client's epsilon and what it was spent on, from privacy.json."""
    spending = []
    for cid, info in sorted(files.privacy.get("clients", {}).items()):
        ledger = info.get("ledger") or []
        training = [e for e in ledger if e.get("kind", "train") == "train"]
        lifetime = info.get("lifetime_epsilon")
        spending.append(
            ClientSpend(
                client=cid,
                accountant=str(info.get("accountant", "prv")),
                delta=float(info["delta"]),
                epsilon=float(info["epsilon"]),
                lifetime_epsilon=float(lifetime) if lifetime is not None else None,
                metrics=str(info.get("metrics", "private")),
                training_rounds=len(training),
                steps=sum(int(e.get("steps", 0)) for e in ledger if e.get("kind", "train") in ("train", "tuning")),
                releases=sum(e.get("kind") == "metrics" for e in ledger),
                tunings=sum(e.get("kind") == "tuning" for e in ledger),
            )
        )
    return spending


ACCOUNTANTS = {
    "prv": "PRV (Gopi et al. 2021, Opacus): a numerically tight upper bound",
    "rdp": "RDP (Mironov 2017, Opacus)",
}


def releases(files: RunFiles) -> list[Release]:
    """What left the clients, and under which guarantee: the update, each metric by the clients'
    modes, the public counts and records."""
    modes: dict[str, list[str]] = {}
    for cid, info in sorted(files.privacy.get("clients", {}).items()):
        modes.setdefault(str(info.get("metrics", "private")), []).append(cid)
    secure = bool(_section(files, "federation").get("secure_aggregation"))
    evaluated = float(_section(files, "federation").get("fraction_evaluate", 1.0) or 0) > 0
    items = [
        Release(
            "The model update of each round (new weights minus the weights received)",
            "record-level differential privacy: per-example clipping and Gaussian noise (DP-SGD), every round on "
            "the client's privacy ledger"
            + ("; only the sum of all updates reached the server (SecAgg+)" if secure else ""),
            True,
        )
    ]
    metric_kinds = ["Training loss", *(["Accuracy and loss on the client's held-out data"] if evaluated else [])]
    for what in metric_kinds:
        for mode, names in modes.items():
            who = "every client" if len(modes) == 1 else ", ".join(names)
            if mode == "private":
                items.append(
                    Release(
                        f"{what} ({who})",
                        "Gaussian noise on clipped per-example values, on the ledger "
                        "(counted in epsilon above); its noise level is sent beside it",
                        True,
                    )
                )
            elif mode == "none":
                items.append(Release(f"{what} ({who})", "not released", True))
            else:
                items.append(
                    Release(
                        f"{what} ({who})",
                        "EXACT values, OUTSIDE the guarantee: the client's policy allowed plain metrics",
                        False,
                    )
                )
    items += [
        Release(
            "Number of examples (training and held-out split sizes)",
            "public by design, as in Opacus's analysis (the sampling rate is computed from it)",
            True,
        ),
        Release(
            "The privacy record (epsilon, delta, noise and sampling parameters of every step)",
            "public: the parameters of what the client ran, no data",
            True,
        ),
        Release(
            "A refusal (the run broke the client's policy or budget)",
            "a sentence built only from the run's settings, the client's policy and its epsilon",
            True,
        ),
        Release("An error", 'a category only (e.g. "data error"); the error\'s text stays on the client', True),
        Release("The data itself", "never: no record, label or feature left any client", True),
    ]
    return items


def audits(files: RunFiles) -> list[Audit]:
    """Empirical lower bounds on epsilon recorded in privacy.json (`audit`, top level or per client:
    an object, or a list of them, each with `epsilon_lower` and its parameters, e.g. m, k,
    confidence, kind). Empty when no audit ran."""
    found: list[Audit] = []

    def collect(scope: str, entry: Any) -> None:
        for item in entry if isinstance(entry, list) else [entry]:
            if isinstance(item, dict) and isinstance(item.get("epsilon_lower"), (int, float)):
                details = {k: v for k, v in item.items() if k != "epsilon_lower"}
                found.append(Audit(scope, float(item["epsilon_lower"]), details))

    for key in ("audit", "audits"):
        if key in files.privacy:
            collect("the run", files.privacy[key])
    if isinstance(files.privacy.get("epsilon_lower"), (int, float)):
        collect(
            "the run",
            {k: v for k, v in files.privacy.items() if k in ("epsilon_lower", "m", "k", "confidence", "kind")},
        )
    for cid, info in sorted(files.privacy.get("clients", {}).items()):
        for key in ("audit", "audits"):
            if key in info:
                collect(cid, info[key])
    return found


COMPARED = ((1.0, 1), (3.0, 1), (8.0, 2))  # epsilons (and decimals) the plain-words meaning compares with


def posterior(epsilon: float, prior: float = 0.5) -> float:
    """The most an observer can believe a record was used, after seeing everything the run released,
    if it believed `prior` before (epsilon-DP bounds the odds ratio by e^epsilon; delta aside)."""
    odds = prior / (1 - prior) * math.exp(min(epsilon, 700.0))
    return odds / (1 + odds)


def epsilon_meaning(epsilon: float, delta: float) -> list[str]:
    """What epsilon = `epsilon` at `delta` means for one person's record, in plain sentences."""
    factor = math.exp(min(epsilon, 700.0))
    one_in = f"1 in {round(1 / delta):,}" if delta > 0 else "none"
    return [
        f"Take any one person whose record is in a client's data. Everything anyone can see from this training "
        f"(the model, every update, every released metric) would have been almost as likely had that record been "
        f"left out: at most {factor:,.1f} times as likely (e^epsilon, with epsilon = {epsilon:.3f}), except with "
        f"a probability of at most delta = {delta:.3g} ({one_in}).",
        f"In betting terms: someone who, before the training, thought it a coin toss (50%) whether this person's "
        f"record was used can be at most {100 * posterior(epsilon):.1f}% sure afterwards, whatever else they know. "
        "For comparison: " + ", ".join(f"epsilon {e:g} allows {100 * posterior(e):.{p}f}%" for e, p in COMPARED) + ".",
        "Smaller is stronger. It bounds what one record adds to what anyone learns; it does not hide what is "
        "true of many people (which is what the model is for), and it is a worst case over every record and "
        "every observer, not an estimate for a typical one.",
    ]
