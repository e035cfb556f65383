"""Query attacks a hostile server ran against fedtrain's clients (issue 12, acceptance 4), as tests.

With crafted global weights the server turns a client's metrics into counting queries over its
private data: a model that predicts class c for every input makes the held-out accuracy the share of
class c, and with learning rate ~0 the train loss counts the training records of class c. Against
plain metrics (the control: what fedtrain released before) both recover exact counts. Against the
defaults every answer carries Gaussian noise of the accounted level, every answer is on the ledger,
and the client stops answering when the run's planned releases are spent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedtrain import protocol
from fedtrain.clients.handlers import loss_bound
from fedtrain.privacy.releases import private_means
from tests.hostile import Client, constant_prediction, provision_clients, run_config


def _allow_plain(client: Client) -> None:
    policy = client.kit / "policy.toml"
    policy.write_text(policy.read_text().replace('metrics = "private"', 'metrics = "plain"'))


def _labels(client: Client) -> np.ndarray:
    with np.load(client.data) as shard:
        return np.asarray(shard["y"])


def _class_counts_from_evaluate(client: Client, config) -> tuple[list[float], int, list[protocol.Reply]]:
    """Ten evaluate queries, one per class: the counts they imply, and the held-out size."""
    answers, replies, held = [], [], 0
    for label in range(10):
        reply = protocol.read_reply(client.send("evaluate", config, constant_prediction(config, label)))
        replies.append(reply)
        held = int(reply.metrics[protocol.NUM_EXAMPLES])
        answers.append(reply.metrics[protocol.EVAL_ACCURACY] * held)
    return answers, held, replies


def _held_out_truth(client: Client, config, held: int) -> np.ndarray:
    from fedtrain.data.partition import holdout_split

    labels = _labels(client)
    _, held_idx = holdout_split(len(labels), config.data.eval_fraction, config.federation.seed)
    assert len(held_idx) == held
    return np.bincount(labels[held_idx], minlength=10)


def test_class_counts_from_evaluate(tmp_path: Path) -> None:
    plain_client, private_client = provision_clients(tmp_path, 2)
    _allow_plain(plain_client)
    # the attack with the largest held-out share the default policy admits
    attack = run_config(eval_fraction=0.2)
    counts, held, _ = _class_counts_from_evaluate(plain_client, attack.replace(metrics="plain"))
    truth = _held_out_truth(plain_client, attack, held)
    assert np.allclose(counts, truth)  # the control: exact class counts in 10 queries

    counts, held, replies = _class_counts_from_evaluate(private_client, attack)
    truth = _held_out_truth(private_client, attack, held)
    exact = sum(round(c) == t for c, t in zip(counts, truth, strict=True))
    assert exact <= 2, (counts, truth)
    # each answer states its noise, which is that of the ledger's entry: sigma * sqrt(2) / n on accuracy
    sigmas = set()
    for number, reply in enumerate(replies, start=1):
        entries = [e for e in reply.privacy.ledger.entries if e.kind == "metrics"]
        assert len(entries) == number  # every query on the ledger
        sigmas.add(entries[-1].noise_multiplier)
        assert reply.metrics[protocol.EVAL_ACCURACY + protocol.STD] == pytest.approx(
            entries[-1].noise_multiplier * math.sqrt(2) / held
        )
    assert len(sigmas) == 1


def test_the_client_stops_answering_when_the_planned_releases_are_spent(tmp_path: Path) -> None:
    """290 queries per image rebuilt held-out images: the run plans 2 releases a round, then refuses."""
    (client,) = provision_clients(tmp_path, 1)
    attack = run_config(rounds=3, eval_fraction=0.2)
    answered = 0
    for _ in range(20):
        reply = protocol.read_reply(client.send("evaluate", attack, constant_prediction(attack, 3)))
        if reply.kind == "refused":
            assert "planned 6 metric releases and has had them all" in reply.reason
            break
        answered += 1
    assert answered == 6


def test_a_label_count_from_the_train_loss(tmp_path: Path) -> None:
    plain_client, private_client = provision_clients(tmp_path, 2)
    _allow_plain(plain_client)
    # lr ~ 0: the loss is measured on the crafted model, ~0 on label 3 and 50 (the margin) on the others
    attack = run_config(lr=1e-9, eval_fraction=0.0)

    reply = protocol.read_reply(
        plain_client.send("train", attack.replace(metrics="plain"), constant_prediction(attack, 3))
    )
    n = int(reply.metrics[protocol.NUM_EXAMPLES])
    truth = int(np.sum(_labels(plain_client) == 3))
    assert round(n * (1 - reply.metrics[protocol.TRAIN_LOSS] / 50.0)) == truth  # the control: the exact count

    reply = protocol.read_reply(private_client.send("train", attack, constant_prediction(attack, 3)))
    n, bound = int(reply.metrics[protocol.NUM_EXAMPLES]), loss_bound(10)
    (release,) = [e for e in reply.privacy.ledger.entries if e.kind == "metrics"]
    # per-example losses are clipped to the bound, so one record moves the sum by at most `bound`, and the
    # count the attack reads, n * (1 - loss / bound), carries noise of sigma records
    assert reply.metrics[protocol.TRAIN_LOSS + protocol.STD] == pytest.approx(release.noise_multiplier * bound / n)
    assert release.noise_multiplier > 20
    assert 0 <= reply.metrics[protocol.TRAIN_LOSS] <= bound


def test_the_gaussian_release_has_the_accounted_noise() -> None:
    """The released means' spread over many draws is sigma * sqrt(K) / n per coordinate (values away from
    the clip, so clipping does not shrink it), and centred on the exact mean."""
    rng = np.random.default_rng(0)
    values = np.stack([rng.uniform(0.4, 0.6, 1000), rng.integers(0, 2, 1000)], axis=1).astype(float)
    sigma = 20.0
    draws = np.array([private_means(values, np.array([1.0, 1.0]), sigma).means for _ in range(4000)])
    expected = sigma * math.sqrt(2) / 1000
    assert np.allclose(draws.std(axis=0), expected, rtol=0.05)
    assert np.allclose(draws.mean(axis=0), values.mean(axis=0), atol=4 * expected / math.sqrt(4000))
