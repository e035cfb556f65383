"""`fedtrain ledger`: a client's privacy history across runs, from its sealed lifetime ledger."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtrain.clients.setup import kit_store
from fedtrain.config import Config
from fedtrain.data import load_shard
from fedtrain.privacy.calibration import client_delta
from fedtrain.privacy.fingerprint import identify
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.privacy.lifetime import StoredShard
from fedtrain.privacy.policy import POLICY_FILE, ClientPolicy
from fedtrain.security.kits import read_kit


@dataclass
class RunLine:
    run: str
    started: str
    rounds: int
    releases: int
    epsilon: float
    delta: float


@dataclass
class ShardLine:
    fingerprint: str
    records: int
    first_used: str
    runs: list[RunLine]
    lifetime_epsilon: float  # this shard's runs and those of every stored shard sharing a record with it
    delta: float
    overlaps: list[str]


def ledger_history(kit: Path, data: Path | None = None, policy: Path | None = None) -> tuple[str, list[ShardLine]]:
    """This client's name and, per stored shard (only the shard at `data` when given), its runs and
    its lifetime epsilon (at the policy's delta, with the policy's accountant).

    Args:
        kit: the client's kit.
        data: a shard to show (found by its contents), or None for every stored shard.
        policy: the policy file (default: the kit's policy.toml).

    Returns:
        (client name, one ShardLine per shard).

    Raises:
        FedtrainError: for a wrong kit, a missing, rolled-back or damaged ledger, or unreadable data.
    """
    kit = kit.resolve()
    name = str(read_kit(kit, "client")["name"])
    rules = ClientPolicy.load(policy or kit / POLICY_FILE)
    store = kit_store(kit, name)
    stored = store.shards()
    if data is None:
        return name, [_line(shard, rules) for shard in stored]
    loaded = load_shard(data, Config(), infer_labels=True)
    wanted = identify(loaded)
    found = [_line(shard, rules) for shard in stored if shard.identity.fingerprint == wanted.fingerprint]
    if found:
        return name, found
    view = store.view(wanted, "")  # a shard never used here, or overlapping one that was
    delta = client_delta(wanted.records, rules.delta)
    overlaps = [s.identity.fingerprint for s in stored if wanted.overlaps(s.identity.digests)]
    lifetime = PrivacyLedger(delta, view.lifetime_entries, rules.accountant).epsilon()
    return name, [ShardLine(wanted.fingerprint, wanted.records, "never", [], lifetime, delta, overlaps)]


def _line(shard: StoredShard, rules: ClientPolicy) -> ShardLine:
    runs = []
    for run in shard.runs:
        delta = run.plan.delta if run.plan else client_delta(shard.identity.records, rules.delta)
        accountant = run.plan.accountant if run.plan else rules.accountant
        train = sum(1 for e in run.entries if e.kind == "train")
        eps = PrivacyLedger(delta, run.entries, accountant).epsilon()
        runs.append(RunLine(run.run, run.started, train, len(run.entries) - train, eps, delta))
    delta = client_delta(shard.identity.records, rules.delta)
    lifetime = PrivacyLedger(delta, shard.lifetime_entries, rules.accountant).epsilon()
    return ShardLine(
        shard.identity.fingerprint, shard.identity.records, shard.first_used, runs, lifetime, delta, shard.overlaps
    )
