"""Epsilon of a list of mechanisms, with Opacus's own accountants (PRV by default, RDP on request).

Every mechanism fedtrain runs on private data is a (noise multiplier, sample rate, steps) triple:
DP-SGD rounds are Poisson-subsampled Gaussians, and a metric release is the plain Gaussian
mechanism, i.e. sample rate 1 and one step. Both accountants compose any mix of them.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections import OrderedDict
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

# Where Opacus's PRV accountant holds, in its float64 arithmetic and in a client's memory. Its grid spans the
# privacy loss over [-L, L], L from RDP (remark 5.6 of Gopi et al.), and it takes e^t over that grid
# (DiscretePRV.compute_epsilon): past t = log(float max) = 709.8 that is inf, and the epsilon it returns inf
# (sigma 0.05, q 0.2, 8 steps: inf, where RDP's valid bound is 1730). Its memory grows with the grid's points,
# 2L / mesh (about 290 bytes a point measured: 3.1e6 points took 880 MB; sigma 0.05, q 0.2, 240 steps would be
# 4.9e8 points, 9-14 GB measured). Beyond either limit the RDP bound, valid too and a few percent larger at such
# epsilons (hundreds or more), is reported instead.
PRV_MAX_LOSS = 700.0
PRV_MAX_POINTS = 2**22
Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps), Opacus's history form
# A tuning (privacy/tuning.py): the best of a random number K ~ D(eta, gamma) of trials, each `steps`
# steps at (sigma, q): (noise multiplier, sample rate, steps, eta, gamma).
Tuning = tuple[float, float, int, float, float]


# ---------------------------------------------------------------- one step's RDP, computed once per process

# (sample rate, noise multiplier) -> the pid that last used it, most recent last
_RDP_PAIRS: OrderedDict[tuple[float, float], int] = OrderedDict()
_RDP_PAIRS_KEPT = 8  # a task's own mechanisms (training, metric releases) are the last it accounts


def _cached_rdp() -> None:
    """Make Opacus compute each (q, sigma, order)'s RDP of one step once per process.

    PRV sizes its grid with two RDP accountings over Opacus's ~80 orders (compute_safe_domain_size), and
    a fractional order is a series sum: about a second a client per round here, the largest share of
    a warm client's task. The value is a pure function of its arguments, so caching changes no number
    (tests/test_accountants.py compares with Opacus's own). The pairs seen are kept (`rdp_pairs`) so a
    warm worker can compute them ahead of the tasks it forks (`warm_rdp`)."""
    from opacus.accountants.analysis import rdp

    if getattr(rdp._compute_rdp, "fedtrain_cached", False):
        return
    exact = rdp._compute_rdp

    @functools.lru_cache(maxsize=65536)
    def cached(q: float, sigma: float, alpha: float) -> float:
        return exact(q, sigma, alpha)

    def noted(q: float, sigma: float, alpha: float) -> float:
        pair = (float(q), float(sigma))
        _RDP_PAIRS[pair] = os.getpid()
        _RDP_PAIRS.move_to_end(pair)
        while len(_RDP_PAIRS) > _RDP_PAIRS_KEPT:
            _RDP_PAIRS.popitem(last=False)
        return cached(q, sigma, alpha)

    noted.fedtrain_cached = True  # type: ignore[attr-defined]
    rdp._compute_rdp = noted  # Opacus's compute_rdp looks the name up at each call


def rdp_pairs() -> list[list[float]]:
    """The (sample rate, noise multiplier) pairs this process accounted last (itself, not its parent): at
    most _RDP_PAIRS_KEPT, so a noise calibration's many candidates are not among them."""
    return [[q, sigma] for (q, sigma), pid in _RDP_PAIRS.items() if pid == os.getpid()]


def warm_rdp(pairs: Iterable[Iterable[float]], limit: int = _RDP_PAIRS_KEPT) -> None:
    """Compute one step's RDP of each (sample rate, noise multiplier) pair at every order the accountants
    use, so that processes forked after this one find them computed.

    Args:
        pairs: (q, sigma) pairs, e.g. another process's `rdp_pairs()`; invalid ones are skipped.
        limit: at most this many pairs are computed.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    _cached_rdp()
    orders = RDPAccountant.DEFAULT_ALPHAS  # what PRV's grid is sized with
    for q, sigma in list(pairs)[:limit]:
        if 0 < q <= 1 and 0 < sigma < math.inf:
            for order in orders:
                rdp._compute_rdp(float(q), float(sigma), float(order))


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

    _cached_rdp()
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
    make_accountant(accountant)  # an unknown name is refused here too
    with warnings.catch_warnings():
        # PRV takes log(1 - q) = log(0) for a q = 1 release on a branch it then discards.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants")
        # an optimum at the largest or smallest order only says the bound could be tighter, never that it is wrong
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp" or not _prv_holds(history, delta):
            engine = make_accountant("rdp")
            engine.history = list(history)
            return float(engine.get_epsilon(delta=delta, alphas=RDP_ORDERS))
        engine = make_accountant("prv")
        engine.history = list(history)
        return float(engine.get_epsilon(delta=delta))


def _prv_holds(history: tuple[Mechanism, ...], delta: float) -> bool:
    """Whether Opacus's PRV accountant can account `history` at `delta`: its grid's half-width stays where e^t
    is finite in float64 (PRV_MAX_LOSS) and its points within PRV_MAX_POINTS."""
    half_width, mesh = _prv_domain(history, delta)
    return half_width <= PRV_MAX_LOSS and 2 * half_width / mesh <= PRV_MAX_POINTS


def _prv_domain(history: tuple[Mechanism, ...], delta: float) -> tuple[float, float]:
    """An upper bound on the half-width L of the grid Opacus's PRV accountant would discretise `history` on, by its
    own domain rule (Gopi et al.: a safe truncation +-L), and the grid's mesh (eps_error / sqrt(T log(12 /
    delta_error) / 2)), at get_epsilon's defaults eps_error 0.01, delta_error delta / 1000. L is exact where the
    cheap bound would not fit PRV's limits."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size
    from opacus.accountants.analysis.rdp import compute_rdp

    eps_error, delta_error = 0.01, delta / 1000
    total = sum(steps for *_, steps in history)
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    # Opacus takes L from RDP epsilons (of the whole history at delta_error / 4, of one step at
    # delta_error / 8T). Any single order's classic conversion bounds each from above, cheaply: when
    # even that bound fits, the exact size (two full RDP accountings, tenths of a second) is not needed.
    orders = [2.0, 4.0, 8.0, 16.0, 32.0]
    whole = sum(
        compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, rate, steps in history
    )
    bound = min(r + math.log(4 / delta_error) / (a - 1) for r, a in zip(whole, orders, strict=True))
    for sigma, rate, _ in history:
        one = compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=orders)
        bound = max(
            bound, min(r + math.log(8 * total / delta_error) / (a - 1) for r, a in zip(one, orders, strict=True))
        )
    half_width = max(bound, eps_error) + 3
    if half_width <= PRV_MAX_LOSS and 2 * half_width / mesh <= PRV_MAX_POINTS:
        return half_width, mesh
    half_width = compute_safe_domain_size(
        prvs=[PoissonSubsampledGaussianPRV(rate, sigma) for sigma, rate, _ in history],
        max_self_compositions=[steps for *_, steps in history],
        eps_error=eps_error,
        delta_error=delta_error,
    )
    return float(half_width), mesh
