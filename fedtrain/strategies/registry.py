"""Registry of aggregation strategies: each name builds one of Flower's strategies from a Config.

Flower strategies see what they expect: client *weights*. The server loop screens every update d
(shapes, dtypes, finite values, optional norm bound) and turns it into w_t + d before aggregation,
so every Flower strategy (mean, median, Krum, FedOpt...) applies unchanged, and fedtrain's own
behaviour (encryption, screening, checkpoints, metrics) wraps it. Each entry checks its own
parameters against the federation's size, so a bad combination fails before anything starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.strategies import central_dp


def _common(config: Config) -> dict[str, Any]:
    weighting = {"weighted_by_key": central_dp.UNIT_WEIGHT} if central_dp.uses_central_dp(config) else {}
    return {
        **weighting,
        "fraction_train": config.federation.fraction_train,
        "fraction_evaluate": config.federation.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if config.federation.fraction_evaluate > 0 else 0,
        # The loop waits (bounded) for these clients before each round; Flower's own wait has no bound.
        "min_available_nodes": config.clients_to_wait_for,
    }


def sampled(config: Config) -> int:
    """Updates a round aggregates at most (the Byzantine bounds are checked against this)."""
    return max(1, int(config.federation.clients * config.federation.fraction_train))


def _fedopt(cls: type, config: Config, betas: bool = True) -> Strategy:
    options: dict[str, Any] = {
        "eta": config.strategy.server_lr if config.strategy.server_lr is not None else 0.1,
        "tau": config.strategy.tau,
    }
    if betas:
        options.update(beta_1=config.strategy.beta_1, beta_2=config.strategy.beta_2)
    return cls(**_common(config), **options)


def _byzantine(config: Config, name: str, needed: Callable[[int], int]) -> int:
    f, n = config.strategy.num_malicious, sampled(config)
    if n < needed(f):
        raise FedtrainError(
            f"{name} with num_malicious = {f} needs at least {needed(f)} clients per round, this run has {n}; "
            "add clients or lower num_malicious."
        )
    return f


def _krum(config: Config) -> Strategy:
    return Krum(**_common(config), num_malicious_nodes=_byzantine(config, "krum", lambda f: 2 * f + 3))


def _multikrum(config: Config) -> Strategy:
    f = _byzantine(config, "multikrum", lambda f: 2 * f + 3)
    m = config.strategy.num_selected if config.strategy.num_selected is not None else sampled(config) - f
    if not 1 <= m <= sampled(config) - f:
        raise FedtrainError(
            f"multikrum's num_selected must be between 1 and clients - num_malicious ({sampled(config) - f}), not {m}."
        )
    return MultiKrum(**_common(config), num_malicious_nodes=f, num_nodes_to_select=m)


def _bulyan(config: Config) -> Strategy:
    return Bulyan(**_common(config), num_malicious_nodes=_byzantine(config, "bulyan", lambda f: 4 * f + 3))


def _trimmed_mean(config: Config) -> Strategy:
    if not 0.0 <= config.strategy.trim_beta < 0.5:
        raise FedtrainError(
            f"trim_beta must be in [0, 0.5), the share cut at each end, not {config.strategy.trim_beta}."
        )
    return FedTrimmedAvg(**_common(config), beta=config.strategy.trim_beta)


def _fedavgm(config: Config) -> Strategy:
    lr = config.strategy.server_lr if config.strategy.server_lr is not None else 1.0
    return FedAvgM(**_common(config), server_learning_rate=lr, server_momentum=config.strategy.server_momentum)


STRATEGIES: dict[str, Callable[[Config], Strategy]] = {
    "fedavg": lambda config: FedAvg(**_common(config)),
    "fedprox": lambda config: FedProx(**_common(config), proximal_mu=config.strategy.proximal_mu),
    "fedadam": lambda config: _fedopt(FedAdam, config),
    "fedyogi": lambda config: _fedopt(FedYogi, config),
    "fedadagrad": lambda config: _fedopt(FedAdagrad, config, betas=False),
    "fedavgm": _fedavgm,
    "krum": _krum,
    "multikrum": _multikrum,
    "bulyan": _bulyan,
    "median": lambda config: FedMedian(**_common(config)),
    "trimmed-mean": _trimmed_mean,
}


# Strategies whose aggregation is FedAvg's weighted mean, then (FedOpt, FedAvgM) a server step on that
# mean. The server may average their updates as they arrive (server/streaming_mean.py), or learn only
# the mean (secure aggregation), and hand the strategy one reply holding it. The others (median,
# Krum, Bulyan, trimmed mean) need every update at once.
STREAMABLE = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"})


def _check_secure_aggregation(config: Config) -> None:
    if config.strategy.name not in STREAMABLE:
        raise FedtrainError(
            f"with secure aggregation the server sees only the mean of the updates, and strategy "
            f"{config.strategy.name!r} needs each one; use {', '.join(sorted(STREAMABLE))}."
        )
    if central_dp.uses_central_dp(config):
        raise FedtrainError(
            "client-level DP clips each update on the server, which secure aggregation hides from it; "
            "use one of central_dp and secure_aggregation."
        )
    if sampled(config) < 3:
        raise FedtrainError(
            f"secure aggregation needs at least 3 clients per round, this run has {sampled(config)}: with 2, "
            "each learns the other's update from the mean."
        )


def make_strategy(config: Config) -> Strategy:
    """The Flower strategy that `config.strategy.name` names, its parameters checked."""
    try:
        build = STRATEGIES[config.strategy.name]
    except KeyError:
        raise FedtrainError(
            f"unknown strategy {config.strategy.name!r}; choose one of {', '.join(STRATEGIES)}."
        ) from None
    if config.federation.secure_aggregation:
        _check_secure_aggregation(config)
    if config.strategy.name == "fedprox" and config.strategy.proximal_mu <= 0:
        raise FedtrainError("fedprox needs proximal_mu > 0 (for example 0.01); with 0 it is fedavg.")
    strategy = build(config)
    return central_dp.wrap(config, strategy, sampled(config)) if central_dp.uses_central_dp(config) else strategy
