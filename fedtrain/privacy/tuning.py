"""What private hyperparameter tuning costs: Papernot and Steinke's random number of trials.

Tuning runs a randomly chosen candidate K times and releases only the best trial (its model and
score). With K drawn from a truncated negative binomial distribution D(eta, gamma) and kept secret,
Papernot and Steinke ("Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022, Theorem 2)
show: if one trial is (lambda, eps(lambda))-RDP at every order, the whole tuning is
(lambda, eps'(lambda))-RDP with

    eps'(lambda) = eps(lambda)
                   + min over lambda_hat >= 1 of [(1 + eta)(1 - 1/lambda_hat) eps(lambda_hat)
                                                  + (1 + eta) log(1/gamma) / lambda_hat]
                   + log(E[K]) / (lambda - 1).

So tuning costs a little more than one run (about 2x for eta = 1, less for eta near 0), not E[K]
runs. The result needs that nothing but the best trial leaves, and that K stays secret: `fedtrain
tune` keeps both (trials are deleted; their number is never written), and runs only in simulation,
where no server sees the trials (docs/privacy.md).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedtrain.errors import FedtrainError

MAX_TRIALS_DRAWN = 1_000_000  # a draw this large has probability far below 1e-100 at any sane E[K]


@dataclass(frozen=True)
class TrialCount:
    """The distribution D(eta, gamma) the number of trials K is drawn from (K >= 1).

    P[K = k] = (1 - gamma)^k / (gamma^-eta - 1) * prod_{l < k} (l + eta) / (l + 1)   (eta != 0),
    P[K = k] = (1 - gamma)^k / (k log(1/gamma))                                        (eta = 0).
    eta = 1 is the geometric distribution, eta = 0 the logarithmic one.
    """

    eta: float
    gamma: float

    def __post_init__(self) -> None:
        if not (self.eta > -1 and 0 < self.gamma < 1 and math.isfinite(self.eta)):
            raise FedtrainError(
                f"a trial-count distribution needs eta > -1 and 0 < gamma < 1 (got {self.eta:g}, {self.gamma:g})."
            )

    @classmethod
    def with_mean(cls, expected: float, eta: float = 0.0) -> TrialCount:
        """The distribution with `eta` whose mean is `expected` trials.

        Raises:
            FedtrainError: when `expected` is not above 1 (one trial is no tuning) or eta <= -1.
        """
        if not expected > 1 or not math.isfinite(expected):
            raise FedtrainError(f"the expected number of trials must be above 1, not {expected:g}.")
        if not eta > -1:
            raise FedtrainError(f"eta must be above -1, not {eta:g}.")
        from scipy.optimize import brentq

        # E[K] falls from infinity to 1 as gamma goes from 0 to 1: one root
        gamma = brentq(lambda g: _mean(eta, g) - expected, 1e-12, 1 - 1e-12, xtol=1e-15, rtol=1e-13)
        return cls(float(eta), float(gamma))

    @property
    def mean(self) -> float:
        """E[K]."""
        return _mean(self.eta, self.gamma)

    def pmf(self, k: int) -> float:
        """P[K = k]."""
        if k < 1:
            return 0.0
        return math.exp(self._log_pmf(k))

    def _log_pmf(self, k: int) -> float:
        eta, gamma = self.eta, self.gamma
        if eta == 0:
            return k * math.log1p(-gamma) - math.log(k) - math.log(math.log(1 / gamma))
        # prod_{l<k} (l + eta)/(l + 1) = Gamma(k + eta) / (Gamma(eta) Gamma(k + 1)); for -1 < eta < 0 both
        # Gamma(eta) and gamma^-eta - 1 are negative, so their absolute values give the same mass
        log_prod = math.lgamma(k + eta) - math.lgamma(eta) - math.lgamma(k + 1)
        return k * math.log1p(-gamma) + log_prod - math.log(abs(gamma**-eta - 1))

    def sample(self, rng: np.random.Generator | None = None) -> int:
        """One draw of K, by inversion of the CDF (exact: no truncation of the support).

        Args:
            rng: the generator; default one seeded from the operating system (`secrets`), since K
                must stay secret.

        Returns:
            K >= 1.
        """
        generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        u = float(generator.random())
        k, mass = 1, self.pmf(1)
        cumulative = mass
        while cumulative < u and k < MAX_TRIALS_DRAWN:
            mass *= (1 - self.gamma) * (k + self.eta) / (k + 1)  # P[k+1] / P[k]
            k += 1
            cumulative += mass
        return k


def _mean(eta: float, gamma: float) -> float:
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def tuned_rdp(base: np.ndarray, orders: np.ndarray, trials: TrialCount) -> np.ndarray:
    """RDP of tuning at each order (Theorem 2 above), from one trial's RDP `base` at `orders`.

    The minimum over lambda_hat runs over `orders` and lambda_hat = 1 (where the first term
    vanishes, whatever eps(1) is); orders not above 1 get infinity (no RDP conversion uses them).

    Args:
        base: one trial's RDP epsilon at each order.
        orders: the RDP orders (as many as `base`).
        trials: the trial-count distribution.

    Returns:
        The tuning's RDP epsilon at each order.
    """
    base, orders = np.asarray(base, dtype=float), np.asarray(orders, dtype=float)
    eta, log_inv_gamma = trials.eta, math.log(1 / trials.gamma)
    candidates = (1 + eta) * (1 - 1 / orders) * base + (1 + eta) * log_inv_gamma / orders
    at_one = (1 + eta) * log_inv_gamma
    selection = min(at_one, float(np.nanmin(np.where(orders >= 1, candidates, np.inf))))
    above_one = orders > 1
    out = np.full_like(base, np.inf)
    out[above_one] = base[above_one] + selection + math.log(trials.mean) / (orders[above_one] - 1)
    return out
