"""How much noise a run needs: the delta rule, noise for a target epsilon, and a client's run plan.

A run's plan is fixed once per client and run, before its first release, from what the client
knows in advance (its number of examples, the run's settings and its own policy):

- metric releases (train loss, held-out loss and accuracy) get a stated share of the run's epsilon:
  their noise is calibrated so that all planned releases alone spend `metrics_share * epsilon`
  (exactly, from the Gaussian mechanism's privacy profile);
- DP-SGD's noise is then calibrated so that training *and* the planned releases, composed by the
  accountant, spend exactly the run's epsilon.

Calibrating for all planned rounds at once (not one round) is what keeps the sum within budget.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedtrain.errors import FedtrainError
from fedtrain.privacy.accountants import Mechanism, epsilon
from fedtrain.privacy.ledger import LedgerEntry
from fedtrain.privacy.tuning import TrialCount

DEFAULT_DELTA = 1e-5
TOLERANCE = 0.005  # calibrated epsilons land in (target - TOLERANCE, target]
MAX_SIGMA = 1e6


def client_delta(num_samples: int, configured: float | None) -> float:
    """The configured delta, or 1e-5 lowered to 1/(10 N) for small datasets.

    Args:
        num_samples: records in the client's shard.
        configured: a delta the run or the client's policy sets, or None.

    Returns:
        The delta to account at.
    """
    if configured is not None:
        return configured
    return min(DEFAULT_DELTA, 1.0 / (10 * max(1, num_samples)))


def noise_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    alongside: Sequence[Mechanism] = (),
) -> float:
    """The smallest noise multiplier (within TOLERANCE in epsilon) whose `steps` at `sample_rate`,
    composed with the mechanisms `alongside`, spend at most `target_epsilon` at `delta`.

    Args:
        target_epsilon: the epsilon to spend.
        delta: the delta it is spent at.
        sample_rate: Poisson sample rate q of each step (1 for a Gaussian release).
        steps: how many steps (or releases) the noise must cover.
        accountant: "prv" or "rdp".
        alongside: mechanisms that will run too and share the budget.

    Returns:
        The noise multiplier.

    Raises:
        FedtrainError: when there is nothing to calibrate, or no noise is enough.
    """
    if steps < 1 or not 0 < sample_rate <= 1:
        raise FedtrainError("cannot calibrate noise: the planned training has no steps.")
    return _noise_for(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, tuple(alongside))


@functools.lru_cache(maxsize=256)
def _noise_for(
    target: float, delta: float, rate: float, steps: int, accountant: str, alongside: tuple[Mechanism, ...]
) -> float:
    """Cached: every client of a simulation with the same plan asks for the same noise."""
    if epsilon(alongside, delta, accountant) >= target:
        raise FedtrainError(f"no noise level reaches epsilon {target:g}; raise the target epsilon.")
    return _smallest_noise(lambda sigma: epsilon([*alongside, (sigma, rate, steps)], delta, accountant), target)


def tuned_noise_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, trials: TrialCount) -> float:
    """The smallest noise multiplier (within TOLERANCE in epsilon) whose tuning, the best of
    K ~ `trials` runs of `steps` steps at `sample_rate`, spends at most `target_epsilon` at `delta`.

    Args:
        target_epsilon: the epsilon of the whole tuning.
        delta: the delta it is spent at.
        sample_rate: DP-SGD's Poisson sample rate.
        steps: DP-SGD steps of one trial.
        trials: the trial count's distribution.

    Returns:
        The noise multiplier.

    Raises:
        FedtrainError: when tuning alone (with no training at all) would spend the budget, or no noise is enough.
    """
    if steps < 1 or not 0 < sample_rate <= 1:
        raise FedtrainError("cannot calibrate noise: the planned training has no steps.")
    floor = tuning_floor(delta, trials)
    if floor >= target_epsilon:
        raise FedtrainError(
            f"tuning with {trials.mean:g} expected trials alone costs epsilon {floor:.3f} at delta {delta:g}, "
            f"before any training: over the budget of {target_epsilon:g}; raise the target epsilon or "
            "expect fewer trials."
        )
    return _tuned_noise_for(float(target_epsilon), float(delta), float(sample_rate), int(steps), trials)


@functools.lru_cache(maxsize=64)
def _tuned_noise_for(target: float, delta: float, rate: float, steps: int, trials: TrialCount) -> float:
    tuning = (rate, steps, trials.eta, trials.gamma)
    return _smallest_noise(lambda sigma: epsilon([], delta, "rdp", [(sigma, *tuning)]), target)


def tuning_floor(delta: float, trials: TrialCount) -> float:
    """What tuning costs with no training at all (every trial's RDP zero): its overhead alone.

    Args:
        delta: the delta it is spent at.
        trials: the trial count's distribution.

    Returns:
        The epsilon of choosing among K ~ `trials` trials that each reveal nothing.
    """
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent

    from fedtrain.privacy.accountants import RDP_ORDERS
    from fedtrain.privacy.tuning import tuned_rdp

    orders = np.asarray(RDP_ORDERS, dtype=float)
    rdp = tuned_rdp(np.zeros_like(orders), orders, trials)
    with warnings.catch_warnings():  # with no training the largest order is the best: that is expected
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)[0])


def _smallest_noise(spend: Callable[[float], float], target: float) -> float:
    """The smallest sigma with spend(sigma) <= target (within TOLERANCE below it); `spend` falls as
    sigma grows. Bracket by halving from 10 (as Opacus starts), then Brent's method on log(sigma):
    about ten accountant calls where a bisection takes twenty (PRV takes tenths of a second each)."""
    from scipy.optimize import brentq

    def excess(log_sigma: float) -> float:
        return spend(math.exp(log_sigma)) - (target - TOLERANCE / 2)

    # Small sigmas are slow to account (PRV's domain grows): never evaluate far below the answer.
    high = math.log(10.0)
    while excess(high) > 0:
        high += math.log(2.0)
        if high > math.log(MAX_SIGMA):
            raise FedtrainError(f"no noise level reaches epsilon {target:g}; raise the target epsilon.")
    low = high - math.log(2.0)
    while excess(low) <= 0:
        high, low = low, low - math.log(2.0)
        if low < math.log(0.05):
            return math.exp(high)
    sigma = math.exp(brentq(excess, low, high, xtol=1e-4))
    while excess(math.log(sigma)) > TOLERANCE / 2:  # land within (target - TOLERANCE, target]
        sigma *= 1.0005
    return sigma


def gaussian_noise_for(target_epsilon: float, delta: float, releases: int) -> float:
    """Noise multiplier for `releases` Gaussian-mechanism releases that spend exactly `target_epsilon`
    at `delta` together, from the Gaussian mechanism's exact privacy profile (Balle and Wang 2018):
    k releases at sigma are one Gaussian mechanism with mu = sqrt(k) / sigma, and
    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2).

    Args:
        target_epsilon: epsilon of all releases together.
        delta: the delta it is spent at.
        releases: how many releases the noise must cover.

    Returns:
        The noise multiplier.
    """
    from scipy.optimize import brentq
    from scipy.special import log_ndtr

    def delta_of(mu: float) -> float:
        return math.exp(log_ndtr(-target_epsilon / mu + mu / 2)) - math.exp(
            target_epsilon + log_ndtr(-target_epsilon / mu - mu / 2)
        )

    high = 1.0
    while delta_of(high) < delta:
        high *= 2
    mu = brentq(lambda m: delta_of(m) - delta, 1e-9, high, xtol=1e-12, rtol=1e-12)
    return math.sqrt(releases) / mu


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "prv"
) -> float:
    """Noise multiplier that spends at most `target_epsilon` over the *whole* planned training."""
    sigma = noise_for(target_epsilon, delta, sample_rate, total_steps, accountant)
    if not math.isfinite(sigma):
        raise FedtrainError(f"no noise level reaches epsilon {target_epsilon}; raise target_epsilon.")
    return sigma


@dataclass(frozen=True)
class RunPlan:
    """What a client will spend in one run, fixed before its first release.

    `metrics_noise` is None when no metric is released privately (metrics "none" or "plain").
    `settings` is a digest of the run's privacy-relevant settings: a run that changes them midway
    is refused instead of silently re-planned. `trials` (eta, gamma) marks a tuning's trial: the
    noise covers the best of K ~ D(eta, gamma) such runs (privacy/tuning.py), charged once.
    `training` holds the local DP-SGD settings the client chose for the run (batch size, local epochs,
    learning rate, clipping bound and which of them a rule chose: fedtrain/training_defaults.py); None in
    plans written before clients chose them.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    metrics_noise: float | None
    releases: int
    delta: float
    accountant: str
    settings: str
    trials: tuple[float, float] | None = None
    training: dict[str, Any] | None = None

    def tuning_entry(self) -> LedgerEntry:
        """The single ledger entry a whole tuning costs (this plan must be a tuning's)."""
        assert self.trials is not None
        count = TrialCount(*self.trials)
        return LedgerEntry.tuning(self.noise_multiplier, self.sample_rate, self.steps_per_round * self.rounds, count)

    def planned_mechanisms(self) -> list[Mechanism]:
        """Everything the run would spend if every round and release happened."""
        planned: list[Mechanism] = [(self.noise_multiplier, self.sample_rate, self.steps_per_round * self.rounds)]
        if self.metrics_noise is not None and self.releases:
            planned.append((self.metrics_noise, 1.0, self.releases))
        return planned

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        try:
            noise = data.get("metrics_noise")
            trials = data.get("trials")
            if trials is not None:
                TrialCount(float(trials[0]), float(trials[1]))  # in range, or refused below
            return cls(
                float(data["noise_multiplier"]),
                float(data["sample_rate"]),
                int(data["steps_per_round"]),
                int(data["rounds"]),
                None if noise is None else float(noise),
                int(data["releases"]),
                float(data["delta"]),
                str(data["accountant"]),
                str(data["settings"]),
                None if trials is None else (float(trials[0]), float(trials[1])),
                dict(data["training"]) if data.get("training") is not None else None,
            )
        except (KeyError, TypeError, ValueError, ArithmeticError, IndexError, FedtrainError) as exc:
            raise FedtrainError(f"a stored run plan is damaged ({exc}); it cannot be trusted.") from None


def plan_run(
    *,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    metrics_share: float,
    releases: int,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    accountant: str,
    settings: str,
    trials: TrialCount | None = None,
    training: dict[str, Any] | None = None,
) -> RunPlan:
    """Calibrate one client's run (or one trial of a tuning).

    Args:
        target_epsilon: epsilon for the whole run (training + metrics), or None with a fixed noise.
        noise_multiplier: DP-SGD's fixed noise multiplier, or None to calibrate it.
        metrics_share: share of the run's epsilon for metric releases (0 < share < 1).
        releases: planned metric releases (0: none are private).
        sample_rate: DP-SGD's Poisson sample rate.
        steps_per_round: DP-SGD steps each round.
        rounds: rounds planned.
        delta: the run's delta.
        accountant: "prv" or "rdp".
        settings: digest of the settings the plan is for.
        trials: for a tuning's trial, the trial count's distribution: the noise is calibrated so that
            the whole tuning spends `target_epsilon` (no private metrics: trials release none).
        training: the local DP-SGD settings chosen for the run, kept with the plan.

    Returns:
        The plan.

    Raises:
        FedtrainError: when no noise reaches the target.
    """
    steps = steps_per_round * rounds
    if trials is not None:
        if target_epsilon is None or releases:
            raise FedtrainError("a tuning is planned from target_epsilon, with no private metric releases.")
        sigma = tuned_noise_for(target_epsilon, delta, sample_rate, steps, trials)
        return RunPlan(sigma, sample_rate, steps_per_round, rounds, None, 0, delta, "rdp", settings,
                       (trials.eta, trials.gamma), training)  # fmt: skip
    if target_epsilon is not None:
        metrics_epsilon = metrics_share * target_epsilon
    elif noise_multiplier is not None:  # a fixed noise: metrics take the same share of what training will spend
        metrics_epsilon = (
            metrics_share / (1 - metrics_share) * epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)
        )
    else:
        raise FedtrainError("a run needs target_epsilon or noise_multiplier to be planned.")
    metrics_noise = gaussian_noise_for(metrics_epsilon, delta, releases) if releases > 0 else None
    metrics = [(metrics_noise, 1.0, releases)] if metrics_noise is not None else []
    if noise_multiplier is None:
        assert target_epsilon is not None  # one of the two is given: checked above
        sigma = noise_for(target_epsilon, delta, sample_rate, steps, accountant, alongside=metrics)
    else:
        sigma = noise_multiplier
    return RunPlan(sigma, sample_rate, steps_per_round, rounds, metrics_noise, releases, delta, accountant, settings,
                   None, training)  # fmt: skip
