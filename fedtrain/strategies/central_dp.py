"""Client-level (central) differential privacy: Flower's server-side clipping wrappers around a
uniform mean of client updates, accounted with Flower's RDP accountant.

Each round the server clips every update d to L2 norm C, averages over the n sampled clients and
adds Gaussian noise of standard deviation sigma * C / n (Flower's wrappers). A released round is
then one Gaussian mechanism with noise multiplier sigma on whole clients' contributions; the rounds
compose. Which clients are online is up to the clients, not a random draw the server controls, so
the accounting takes no credit for sampling (Flower's "no-amplification"): an upper bound.

A round is released only when exactly the n sampled clients' updates reach the mean. With fewer,
the mean divides by fewer and the noise no longer covers one client: such a round keeps the old
model and spends nothing. Clients are weighted equally, whatever their data size, for the same
reason: the noise is set for a weight of 1/n per client.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.errors import FedtrainError

UNIT_WEIGHT = protocol.UNIT_WEIGHT  # every accepted update carries weight 1 under it: a uniform mean
MEAN_STRATEGIES = ("fedavg", "fedprox")  # the ones whose aggregate is the mean the noise is set for


def uses_central_dp(config: Config) -> bool:
    return config.privacy.central_dp != "off"


def _accountant(config: Config, max_epsilon: float | None) -> Any:
    try:
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(
            PrivacyConfig(
                target_delta=config.effective_central_delta,
                population_size=config.federation.clients,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=max_epsilon,
            )
        )
    except ImportError:
        raise FedtrainError(
            "client-level DP accounting needs Flower's accountant: install fedtrain again (it pulls flwr[dp])."
        ) from None


def release(config: Config, sampled: int) -> GaussianPrivacyEvent:
    """What one released round costs in client-level privacy."""
    return GaussianPrivacyEvent(
        noise_multiplier=config.privacy.central_noise_multiplier,
        sample_size=sampled,
        population_size=config.federation.clients,
    )


def planned_epsilon(config: Config, sampled: int, rounds: int) -> float:
    """Client-level epsilon after `rounds` released rounds (at the run's central delta)."""
    if rounds == 0:
        return 0.0
    accountant = _accountant(config, None)
    accountant.compose(release(config, sampled), count=rounds)
    return accountant.get_epsilon(config.effective_central_delta)


def check_plan(config: Config, sampled: int) -> None:
    """Refuse to start a run whose planned rounds would exceed max_client_epsilon."""
    limit = config.privacy.max_client_epsilon
    if limit is None:
        return
    planned = planned_epsilon(config, sampled, config.federation.rounds)
    if planned <= limit:
        return
    low, high = 0, config.federation.rounds  # the most rounds that fit: planned_epsilon grows with rounds
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if planned_epsilon(config, sampled, mid) <= limit else (low, mid - 1)
    raise FedtrainError(
        f"{config.federation.rounds} rounds of client-level DP with central_noise_multiplier = "
        f"{config.privacy.central_noise_multiplier:g} would spend epsilon {planned:.3f} at delta "
        f"{config.effective_central_delta:g}, above max_client_epsilon = {limit:g}; "
        + (f"run at most {low} rounds or raise central_noise_multiplier." if low else "raise central_noise_multiplier.")
    )


def count_stddev(config: Config, sampled: int) -> float:
    """Noise on the adaptive rule's count of clipped updates. Flower's default n/20 only works when
    sigma < n/10; past that, sigma itself (which costs the update 15% more noise, never privacy)."""
    return max(sampled / 20, config.privacy.central_noise_multiplier)


class _PrivateNoise:
    """Noise from this strategy's own generator, seeded from the OS and never stored or shared
    (overrides Flower's hooks fedtrain/_flower.py names: DP_NOISE_HOOK, DP_COUNT_HOOK).

    Flower draws it from NumPy's global Mersenne Twister: any code in the process can read or seed
    that state, and from it recompute, then subtract, the noise of every release."""

    _rng: np.random.Generator | None = None
    # set by the Flower DP wrapper this is mixed into
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    clipped_count_stddev: float

    def _generator(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))
        return self._rng

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        rng = self._generator()
        arrays = {k: a.numpy() for k, a in aggregated.items()}
        noised = {k: a + rng.normal(0.0, std, a.shape).astype(a.dtype) for k, a in arrays.items()}
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in noised.items()})

    def _noisy_fraction(self, count: int, total: int) -> float:
        return float(self._generator().normal(count, self.clipped_count_stddev)) / float(total)


class FixedClipping(_PrivateNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping and accountant, with private noise."""


class AccountedAdaptiveClipping(_PrivateNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's adaptive clipping, released only over all n sampled updates, accounted, and moving
    its bound in the right direction.

    Flower's adaptive wrapper takes no accountant; by its construction (Andrew et al. 2021) the noisy
    update and the noisy clipped count together cost one Gaussian mechanism of the configured sigma."""

    def __init__(self, strategy: Strategy, config: Config, sampled: int) -> None:
        super().__init__(
            strategy,
            noise_multiplier=config.privacy.central_noise_multiplier,
            num_sampled_clients=sampled,
            initial_clipping_norm=config.privacy.central_clipping_norm,
            target_clipped_quantile=config.privacy.central_target_quantile,
            clip_norm_lr=config.privacy.central_clip_lr,
            clipped_count_stddev=count_stddev(config, sampled),
        )
        self.accountant = _accountant(config, config.privacy.max_client_epsilon)
        self.event = release(config, sampled)

    def _geometric_update(self, clipped_fraction: float) -> None:  # _flower.DP_BOUND_HOOK
        # Andrew et al.'s rule moves the bound by the share of updates *under* it:
        # C <- C exp(-lr (unclipped - quantile)). Flower 1.42 feeds the clipped share into the same
        # formula, which shrinks a bound that clips everything, towards 0; correct the sign here.
        super()._geometric_update(1.0 - clipped_fraction)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if len(replies) != self.num_sampled_clients or any(reply.has_error() for reply in replies):
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.accountant.compose(self.event)
        return arrays, metrics


def wrap(config: Config, base: Strategy, sampled: int) -> Strategy:
    """`base` wrapped in Flower's central-DP clipping and noise, with its accountant."""
    if config.strategy.name not in MEAN_STRATEGIES:
        raise FedtrainError(
            f"client-level DP adds noise to a mean of clipped updates; strategy {config.strategy.name!r} is not a "
            f'mean: use {" or ".join(MEAN_STRATEGIES)}, or set central_dp = "off".'
        )
    check_plan(config, sampled)
    if config.privacy.central_dp == "fixed":
        return FixedClipping(
            base,
            noise_multiplier=config.privacy.central_noise_multiplier,
            clipping_norm=config.privacy.central_clipping_norm,
            num_sampled_clients=sampled,
            accountant=_accountant(config, config.privacy.max_client_epsilon),
        )
    return AccountedAdaptiveClipping(base, config, sampled)


def spent_epsilon(strategy: Strategy) -> float | None:
    """Client-level epsilon spent so far, or None when the run has no central DP."""
    accountant = getattr(strategy, "accountant", None)
    return None if accountant is None else accountant.get_privacy_spent().epsilon


def report(strategy: Strategy, config: Config, released_rounds: list[int]) -> dict[str, Any] | None:
    """The client-level part of privacy.json: enough to recompute epsilon with another accountant."""
    if not uses_central_dp(config):
        return None
    epsilon = spent_epsilon(strategy)
    return {
        "mechanism": "Gaussian on the uniform mean of updates clipped to L2 norm C "
        f"({config.privacy.central_dp} clipping)",
        "noise_multiplier": config.privacy.central_noise_multiplier,
        "sampling": "no amplification (every released round counts in full)",
        "neighbouring": "add or remove one client",
        "population": config.federation.clients,
        "delta": config.effective_central_delta,
        "released_rounds": released_rounds,
        "epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
        "accountant": "RDP (Flower's flwr.supercore.privacy_accounting, backed by Google's dp-accounting)",
    }
