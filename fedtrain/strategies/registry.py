"""Registry of aggregation strategies. Each entry builds a Flower strategy from a Config.

Flower strategies see what they expect: client *weights*. The server loop turns each client's
update d into w_t + d before aggregation, so every Flower strategy (mean, median, FedOpt...)
applies unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, Strategy

from fedtrain.config import Config
from fedtrain.errors import FedtrainError


def _fedavg(config: Config) -> Strategy:
    return FedAvg(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        # The loop waits (bounded) for min_fit_clients before each round; Flower's own wait has no bound.
        min_available_nodes=config.min_fit_clients,
    )


STRATEGIES: dict[str, Callable[[Config], Strategy]] = {"fedavg": _fedavg}


def make_strategy(config: Config, name: str = "fedavg") -> Strategy:
    try:
        return STRATEGIES[name](config)
    except KeyError:
        raise FedtrainError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.") from None
