"""A lifetime ledger per shard (issue 12, acceptance 2): runs over the same data compose into one
epsilon, checked against Opacus's own accountant; the lifetime cap refuses the run that would pass
it; a lost, rolled-back, swapped or damaged ledger is refused, never taken as a fresh start."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import PRVAccountant

from fedtrain import protocol
from fedtrain.clients.deployment import check_privacy
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import fedtrain_home
from tests.hostile import Client, initial_weights, provision_clients, run_config

RUN = run_config(rounds=2, target_epsilon=1.5)


def _train_run(client: Client, run: str, rounds: int = 2) -> list[protocol.Reply]:
    weights = initial_weights(RUN)
    out = []
    for _ in range(rounds):
        out.append(protocol.read_reply(client.send("train", RUN, weights, run)))
        out.append(protocol.read_reply(client.send("evaluate", RUN, weights, run)))
    return out


def _independent_epsilon(ledgers: list[list], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for ledger in ledgers for e in ledger]
    return accountant.get_epsilon(delta=delta)


def test_three_runs_over_one_shard_compose_and_the_lifetime_cap_refuses_the_fourth(tmp_path: Path) -> None:
    (client,) = provision_clients(tmp_path, 1)
    runs = [_train_run(client, f"run-{i}") for i in (1, 2, 3)]
    last = [reply.privacy for reply in (r[-1] for r in runs)]
    for replies in runs:
        assert [r.kind for r in replies] == ["update", "metrics"] * 2
    # each run, on its own, is within its target; every run starts from its own zero
    for report in last:
        assert report.epsilon <= 1.5 + 1e-9
        assert [e.kind for e in report.ledger.entries] == ["train", "metrics", "metrics"] * 2
    # the third run's lifetime epsilon is that of all three runs' ledgers, composed
    delta = last[0].ledger.delta
    expected = _independent_epsilon([r.ledger.entries for r in last], delta)
    assert last[2].lifetime_epsilon == pytest.approx(expected, rel=1e-3)
    assert last[0].lifetime_epsilon < last[1].lifetime_epsilon < last[2].lifetime_epsilon
    # the default cap (max_lifetime_epsilon 10) admits these three; with the cap at their total, the next is refused
    policy = client.kit / "policy.toml"
    policy.write_text(
        policy.read_text().replace("max_lifetime_epsilon = 10.0", f"max_lifetime_epsilon = {expected:.4f}")
    )
    reply = protocol.read_reply(client.send("train", RUN, initial_weights(RUN), "run-4"))
    assert reply.kind == "refused" and reply.refusal_kind == protocol.BUDGET, reply
    assert "over its max_lifetime_epsilon" in reply.reason and f"from {expected:.3f}" in reply.reason


def test_a_shard_sharing_records_with_one_seen_before_inherits_its_ledger(tmp_path: Path) -> None:
    (client,) = provision_clients(tmp_path, 1)
    first = _train_run(client, "run-1")[-1].privacy
    with np.load(client.data) as shard:  # the same records and one more, in another order
        x, y = np.concatenate([shard["x"], shard["x"][:1]])[::-1], np.concatenate([shard["y"], shard["y"][:1]])[::-1]
    grown = tmp_path / "grown.npz"
    np.savez(grown, x=x, y=y)
    client.node_config["data-path"] = str(grown)
    reply = protocol.read_reply(client.send("train", RUN, initial_weights(RUN), "run-2"))
    single = _independent_epsilon([reply.privacy.ledger.entries], reply.privacy.ledger.delta)
    assert reply.privacy.epsilon == pytest.approx(single, rel=1e-3)  # a new run, from zero
    both = _independent_epsilon([first.ledger.entries, reply.privacy.ledger.entries], reply.privacy.ledger.delta)
    assert reply.privacy.lifetime_epsilon == pytest.approx(both, rel=1e-3)  # but its records remember run 1


def _store(client: Client) -> Path:
    return fedtrain_home() / "ledgers" / client.kit.name


def test_a_deleted_ledger_is_refused_not_started_again(tmp_path: Path) -> None:
    (client,) = provision_clients(tmp_path, 1)
    _train_run(client, "run-1", rounds=1)
    shutil.rmtree(_store(client))
    reply = protocol.read_reply(client.send("train", RUN, initial_weights(RUN), "run-2"))
    assert reply.kind == "error" and reply.reason == "ledger error"
    with pytest.raises(FedtrainError, match="privacy ledger .* is missing, but its anchor says it was written 2 times"):
        check_privacy(client.kit, "client-1", None)  # `fedtrain client` stops before it connects


def test_a_rolled_back_ledger_is_refused(tmp_path: Path) -> None:
    (client,) = provision_clients(tmp_path, 1)
    _train_run(client, "run-1", rounds=1)
    backup = tmp_path / "backup"
    shutil.copytree(_store(client), backup)
    _train_run(client, "run-2", rounds=1)
    shutil.rmtree(_store(client))
    shutil.copytree(backup, _store(client))  # yesterday's ledger put back: run-2 forgotten
    with pytest.raises(FedtrainError, match="older than its anchor .* it was rolled back"):
        check_privacy(client.kit, "client-1", None)
    reply = protocol.read_reply(client.send("train", RUN, initial_weights(RUN), "run-3"))
    assert reply.kind == "error" and reply.reason == "ledger error"


def test_another_clients_or_an_edited_ledger_is_refused(tmp_path: Path) -> None:
    one, two = provision_clients(tmp_path, 2)
    _train_run(one, "run-1", rounds=1)
    _train_run(two, "run-1", rounds=1)
    store = _store(one) / "ledger.ftenc"
    original = store.read_bytes()
    store.write_bytes((_store(two) / "ledger.ftenc").read_bytes())  # client-2's ledger in client-1's place
    with pytest.raises(FedtrainError, match="does not open with its key"):
        check_privacy(one.kit, "client-1", None)
    store.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(FedtrainError, match="does not open with its key"):
        check_privacy(one.kit, "client-1", None)
    store.write_bytes(original)
    (one.kit / "ledger.anchor").unlink()
    with pytest.raises(FedtrainError, match="ledger anchor .* is missing"):
        check_privacy(one.kit, "client-1", None)


def test_fedtrain_ledger_shows_the_history(tmp_path: Path, capsys) -> None:
    from tests.conftest import run_cli

    (client,) = provision_clients(tmp_path, 1)
    code, out, err = run_cli(["ledger", "--kit", str(client.kit)], capsys)
    assert code == 0 and "nothing spent yet" in out, err
    reports = [_train_run(client, run, rounds=1)[-1].privacy for run in ("run-a", "run-b")]
    code, out, err = run_cli(["ledger", "--kit", str(client.kit), "--data", str(client.data)], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert f"lifetime epsilon {reports[1].lifetime_epsilon:.3f}" in text
    for run, report in zip(("run-a", "run-b"), reports, strict=True):
        assert f"run {run}" in text and f"epsilon {report.epsilon:.3f}" in text
        assert "over 1 rounds and 2 metric releases" in text
