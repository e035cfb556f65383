"""Simulation splits: disjoint, complete, seeded; Dirichlet really skews labels."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrain.config import Config
from fedtrain.data.partition import dirichlet, holdout_split, iid, simulation_shard, simulation_test_set
from fedtrain.errors import FedtrainError


def _check_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n


def test_iid_is_disjoint_complete_balanced_and_seeded() -> None:
    parts = iid(103, 5, seed=1)
    _check_partition(parts, 103)
    assert {len(p) for p in parts} <= {20, 21}
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid(103, 5, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, iid(103, 5, seed=2), strict=True))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha() -> None:
    labels = np.repeat(np.arange(10), 100)

    def mean_classes_per_client(alpha: float) -> float:
        parts = dirichlet(labels, 10, alpha, seed=0)
        _check_partition(parts, len(labels))
        # classes holding at least 5% of the client's data
        return float(np.mean([(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)).sum() for p in parts]))

    assert mean_classes_per_client(0.1) < 4 < 8 < mean_classes_per_client(100.0)


def test_dirichlet_that_cannot_feed_every_client_is_a_clear_error() -> None:
    with pytest.raises(FedtrainError, match="raise alpha or use fewer clients"):
        dirichlet(np.zeros(12, dtype=int), 10, 0.01, seed=0, min_size=2)


def test_holdout_split_keeps_training_data() -> None:
    train, held = holdout_split(10, 0.2, seed=0)
    assert len(train) == 8 and len(held) == 2 and not set(train) & set(held)
    train, held = holdout_split(1, 0.5, seed=0)
    assert len(train) == 1 and len(held) == 0


def test_simulation_shards_never_contain_test_samples() -> None:
    config = Config(clients=4, labels=[str(i) for i in range(10)])
    test = simulation_test_set(config)
    test_rows = {row.tobytes() for row in test.batch(np.arange(len(test)))[0]}
    shards = [simulation_shard(config, pid) for pid in range(4)]
    assert sum(len(s) for s in shards) + len(test) == 1797
    for shard in shards:
        assert not test_rows & {row.tobytes() for row in shard.batch(np.arange(len(shard)))[0]}


def test_too_many_clients_for_the_data() -> None:
    with pytest.raises(FedtrainError, match="cannot feed"):
        simulation_shard(Config(clients=1000, labels=[str(i) for i in range(10)]), 0)
