"""Epsilon of a list of mechanisms, with Opacus's own accountants (PRV by default, RDP on request).

Every mechanism fedtrain runs on private data is a (noise multiplier, sample rate, steps) triple:
DP-SGD rounds are Poisson-subsampled Gaussians, and a metric release is the plain Gaussian
mechanism, i.e. sample rate 1 and one step. Both accountants compose any mix of them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedtrain.config import ACCOUNTANTS
from fedtrain.errors import FedtrainError

if TYPE_CHECKING:  # Opacus imports torch: only what accounts pays for it (clients/app.py stays light)
    from opacus.accountants import IAccountant

# Opacus's own RDP orders (RDPAccountant.DEFAULT_ALPHAS) stop at 63; a heavily noised Gaussian release
# (q = 1, what a metric release is) is tightest at larger orders.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 256, 4))
RDP_ORDERS += list(range(256, 4097, 64))

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps), Opacus's history form
# A tuning (privacy/tuning.py): the best of a random number K ~ D(eta, gamma) of trials, each `steps`
# steps at (sigma, q): (noise multiplier, sample rate, steps, eta, gamma).
Tuning = tuple[float, float, int, float, float]


def make_accountant(name: str) -> IAccountant:
    """An empty Opacus accountant by name.

    Args:
        name: "prv" or "rdp".

    Returns:
        The accountant, from Opacus's registry.

    Raises:
        FedtrainError: for any other name.
    """
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise FedtrainError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}.")
    return create_accountant(name)


def epsilon(
    mechanisms: Iterable[Mechanism], delta: float, accountant: str = "prv", tunings: Iterable[Tuning] = ()
) -> float:
    """Epsilon at `delta` of every mechanism (and tuning) composed.

    Composition is commutative: mechanisms with the same (sigma, q) are one mechanism with their steps
    summed, which gives the same epsilon and keeps PRV's cost flat however many rounds there are.
    A tuning's guarantee is an RDP result (Papernot and Steinke): with any tuning, everything is
    composed in RDP, whatever `accountant` says (RDP is never tighter than PRV, so this only errs
    on the side of a larger epsilon).

    Args:
        mechanisms: (noise multiplier, sample rate, steps) triples.
        delta: the delta to report epsilon at.
        accountant: "prv" or "rdp".
        tunings: (noise multiplier, sample rate, steps, eta, gamma) tunings.

    Returns:
        Epsilon (0.0 when nothing ran).

    Raises:
        FedtrainError: for an unknown accountant.
    """
    tuned = tuple(sorted((float(s), float(q), int(n), float(e), float(g)) for s, q, n, e, g in tunings))
    if tuned:
        make_accountant(accountant)  # an unknown name is refused here too
        plain = tuple(sorted((float(s), float(q), int(n)) for s, q, n in mechanisms if n))
        return _tuned_epsilon(plain, tuned, float(delta))
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in mechanisms:
        if count:
            steps[(float(sigma), float(rate))] = steps.get((float(sigma), float(rate)), 0) + int(count)
    if not steps:
        return 0.0
    return _epsilon(tuple(sorted((sigma, rate, count) for (sigma, rate), count in steps.items())), delta, accountant)


@functools.lru_cache(maxsize=256)
def _tuned_epsilon(plain: tuple[Mechanism, ...], tunings: tuple[Tuning, ...], delta: float) -> float:
    """RDP of the plain mechanisms plus each tuning's RDP (Theorem 2), converted to (epsilon, delta)
    as Opacus's RDP accountant does (Balle et al. 2020)."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedtrain.privacy.tuning import TrialCount, tuned_rdp

    orders = np.asarray(RDP_ORDERS, dtype=float)
    total = np.zeros_like(orders)
    for sigma, rate, steps in plain:
        total += compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(orders))
    for sigma, rate, steps, eta, gamma in tunings:
        base = compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(orders))
        total += tuned_rdp(np.asarray(base), orders, TrialCount(eta, gamma))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        spent, _ = get_privacy_spent(orders=list(orders), rdp=list(total), delta=delta)
    return float(spent)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[Mechanism, ...], delta: float, accountant: str) -> float:
    """Cached: a client asks for the same composition several times a round (its budget check, its
    report, the other clients of a simulation with the same plan), and PRV takes tenths of a second."""
    engine = make_accountant(accountant)
    engine.history = list(history)
    with warnings.catch_warnings():
        # PRV takes log(1 - q) = log(0) for a q = 1 release on a branch it then discards.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "rdp":
            return float(engine.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        return float(engine.get_epsilon(delta=delta))
