"""Deterministic splits: the global test set, client shards (IID or Dirichlet label skew), and
each client's held-out evaluation split. Same seed, same splits, in every process."""

from __future__ import annotations

import functools

import numpy as np

from fedtrain.config import Config
from fedtrain.data.datasets import Dataset
from fedtrain.data.formats import load_source
from fedtrain.errors import FedtrainError

MAX_DIRICHLET_TRIES = 100


def test_split(dataset: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test); stratified by class when every class has at least two samples."""
    n = len(dataset)
    indices = np.arange(n)
    if fraction <= 0:
        return indices, indices[:0]
    from sklearn.model_selection import train_test_split

    labels = dataset.targets() if dataset.class_names else None
    stratify = None
    if labels is not None:
        counts = np.bincount(labels, minlength=dataset.num_classes)
        stratify = labels if counts[counts > 0].min() >= 2 and round(n * fraction) >= dataset.num_classes else None
    train, test = train_test_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def iid(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 2) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions ~ Dirichlet(alpha).

    Small alpha gives clients few classes. Draws again (bounded) until every client has at
    least `min_size` samples, so no client is left without data.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FedtrainError(
        f"Dirichlet partition with alpha={alpha} left a client with fewer than {min_size} samples "
        f"in {MAX_DIRICHLET_TRIES} draws; raise alpha or use fewer clients."
    )


def partition(dataset: Dataset, config: Config) -> list[np.ndarray]:
    """Split the (training part of a) dataset into `config.federation.clients` shards."""
    if len(dataset) < 2 * config.federation.clients:
        raise FedtrainError(
            f"{len(dataset)} training samples cannot feed {config.federation.clients} clients (at least 2 each); "
            "use fewer clients or more data."
        )
    if config.data.partition == "iid":
        return iid(len(dataset), config.federation.clients, config.federation.seed)
    if not dataset.class_names:
        raise FedtrainError("a Dirichlet partition skews the classes of a classification task; use partition iid.")
    return dirichlet(dataset.targets(), config.federation.clients, config.data.alpha, config.federation.seed)


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's (train, held-out evaluation) indices; at least one training sample."""
    order = np.random.default_rng(seed).permutation(num_samples)
    held = min(int(round(num_samples * fraction)), num_samples - 1)
    return np.sort(order[held:]), np.sort(order[:held])


# ---------------------------------------------------------------- simulation view of one dataset


Split = tuple[Dataset, Dataset, tuple[np.ndarray, ...]]  # (training part, test part, each client's indices)


def _split(config: Config, source: Dataset) -> Split:
    train_idx, test_idx = test_split(source, config.data.test_fraction, config.federation.seed)
    train = source.subset(train_idx)
    return train, source.subset(test_idx), tuple(partition(train, config))


@functools.lru_cache(maxsize=4)
def _split_of_config(key: tuple, target_kind: str) -> Split:
    config = Config.from_run_config(dict(key))
    return _split(config, load_source(config, target_kind))


_GIVEN: dict[tuple[int, tuple], Split] = {}  # splits of datasets given as objects (fedtrain.simulate)


def simulation_split(config: Config, source: Dataset | None = None, target_kind: str = "classes") -> Split:
    """How a simulation splits its dataset (the config's, read with targets of `target_kind`, or
    `source`): seeded, the same in every process."""
    key = tuple(sorted(config.to_run_config().items()))
    if source is None:
        return _split_of_config(key, target_kind)
    if (id(source), key) not in _GIVEN:
        _GIVEN.clear()  # one run's dataset at a time
        _GIVEN[(id(source), key)] = _split(config, source)
    return _GIVEN[(id(source), key)]


def simulation_shard(
    config: Config, partition_id: int, source: Dataset | None = None, target_kind: str = "classes"
) -> Dataset:
    """The shard simulated client `partition_id` holds (same in every process: seeded)."""
    train, _, parts = simulation_split(config, source, target_kind)
    if not 0 <= partition_id < len(parts):
        raise FedtrainError(f"partition {partition_id} does not exist: the run has {len(parts)} clients.")
    return train.subset(parts[partition_id])


def held_out_seed(config: Config, partition_id: int | None = None) -> int:
    """The seed of a client's held-out draw: the run's seed for a real node's shard, and for simulated
    client `partition_id` its own draw (its shard is cut from the same dataset as the others')."""
    seed = config.federation.seed
    return seed if partition_id is None else seed * 1_000_003 + partition_id


def simulation_client_split(
    config: Config, partition_id: int, source: Dataset | None = None, target_kind: str = "classes"
) -> tuple[Dataset, Dataset]:
    """(training split, held-out split) of simulated client `partition_id`'s shard, as that client makes them."""
    shard = simulation_shard(config, partition_id, source, target_kind)
    train_idx, held_idx = holdout_split(len(shard), config.data.eval_fraction, held_out_seed(config, partition_id))
    return shard.subset(train_idx), shard.subset(held_idx)


def simulation_test_set(config: Config, source: Dataset | None = None, target_kind: str = "classes") -> Dataset:
    """The global test split the server evaluates on in simulation (never given to a client)."""
    return simulation_split(config, source, target_kind)[1]
