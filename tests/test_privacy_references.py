"""The privacy ledger against published numbers, not against our own output.

- Opacus's golden value for its RDP accountant (sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> 7.3291).
- TF Privacy's MNIST tutorial (N 60000, batch 256, sigma 1.1, 60 epochs, delta 1e-5): eps 3.01 with the
  classic RDP -> (eps, delta) conversion (Mironov 2017), about 2.60 with the tighter conversion
  Opacus uses (Balle et al. 2020).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from fedtrain.privacy.calibration import calibrate_noise, client_delta
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def classic_rdp_to_dp(rdp: np.ndarray, orders: list[float], delta: float) -> float:
    """eps = min_alpha rdp(alpha) + log(1/delta) / (alpha - 1), written out here on purpose."""
    return float(min(r + math.log(1 / delta) / (a - 1) for r, a in zip(rdp, orders, strict=True)))


def test_opacus_golden_value() -> None:
    ledger = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(1.5, 0.04, 2250)], accountant="rdp")
    assert ledger.epsilon() == pytest.approx(7.3291, abs=1e-3)


def test_tf_privacy_mnist_reference_classic_conversion() -> None:
    q, steps = 256 / 60000, int(60 * 60000 / 256)
    rdp = compute_rdp(q=q, noise_multiplier=1.1, steps=steps, orders=ORDERS)
    assert classic_rdp_to_dp(rdp, ORDERS, 1e-5) == pytest.approx(3.01, abs=0.02)


def test_tf_privacy_mnist_reference_with_our_ledger() -> None:
    q, steps = 256 / 60000, int(60 * 60000 / 256)
    # 60 epochs as 12 rounds of 5 epochs: the ledger must equal one accountant over all steps.
    per_round = steps // 12
    entries = [LedgerEntry(1.1, q, per_round)] * 11 + [LedgerEntry(1.1, q, steps - 11 * per_round)]
    ledger = PrivacyLedger(delta=1e-5, entries=entries, accountant="rdp")
    assert ledger.total_steps == steps
    assert ledger.epsilon() == pytest.approx(2.60, abs=0.03)
    assert ledger.epsilon() < 3.01  # tighter than the classic conversion, never looser


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("rounds", [1, 3, 10, 40])
def test_ledger_over_rounds_equals_one_accountant(rounds: int, accountant: str) -> None:
    ledger = PrivacyLedger(delta=1e-5, accountant=accountant)
    for _ in range(rounds):
        ledger.record(LedgerEntry(0.9, 0.05, 37))
    single = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    single.history = [(0.9, 0.05, 37 * rounds)]
    assert ledger.epsilon() == pytest.approx(single.get_epsilon(delta=1e-5), rel=1e-6)


def test_prv_is_tighter_than_rdp_on_the_mnist_reference() -> None:
    q, steps = 256 / 60000, int(60 * 60000 / 256)
    rdp = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(1.1, q, steps)], accountant="rdp").epsilon()
    prv = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(1.1, q, steps)], accountant="prv").epsilon()
    assert 2.0 < prv < rdp


def test_mixed_rounds_compose_like_the_accountant_history() -> None:
    entries = [LedgerEntry(1.0, 0.1, 10), LedgerEntry(2.0, 0.2, 5), LedgerEntry(1.0, 0.1, 10)]
    for accountant, reference in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
        reference.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        ledger = PrivacyLedger(delta=1e-5, entries=entries, accountant=accountant)
        assert ledger.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=0.01)


def test_ledger_grows_monotonically_and_never_forgets() -> None:
    ledger = PrivacyLedger(delta=1e-5)
    previous = 0.0
    for _ in range(5):
        ledger.record(LedgerEntry(1.0, 0.1, 10))
        now = ledger.epsilon()
        assert now > previous
        previous = now
    restored = PrivacyLedger.from_dict(ledger.to_dict())
    assert restored.epsilon() == pytest.approx(previous)


def test_planned_round_projection_matches_recording() -> None:
    ledger = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(1.2, 0.1, 20)])
    planned = LedgerEntry(1.2, 0.1, 20)
    projected = ledger.epsilon(planned)
    ledger.record(planned)
    assert ledger.epsilon() == pytest.approx(projected)


def test_noise_calibrated_for_the_whole_training_not_one_round() -> None:
    q, per_round, rounds = 0.2, 5, 15
    sigma = calibrate_noise(3.0, 1e-5, q, per_round * rounds)
    ledger = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(sigma, q, per_round)] * rounds)
    assert 2.9 <= ledger.epsilon() <= 3.0
    one_round_sigma = calibrate_noise(3.0, 1e-5, q, per_round)
    assert one_round_sigma < sigma  # calibrating per round would spend far more in total


def test_default_delta_shrinks_for_small_datasets() -> None:
    assert client_delta(5000, None) == 1e-5
    assert client_delta(60000, None) == pytest.approx(1 / 600000)
    assert client_delta(100, 1e-3) == 1e-3


# ---------------------------------------------------------------- tiny noise: huge epsilons, finite and valid


def tight_gaussian_epsilon(sigma: float, q: float, delta: float) -> float:
    """The exact epsilon at `delta` of ONE Poisson-subsampled Gaussian step (add/remove one example), written out
    here from the privacy loss of (1 - q) N(0, s^2) + q N(1, s^2) against N(0, s^2): L(x) = log(1 - q + q e^((2x
    - 1) / 2s^2)) exceeds eps past x* = s^2 log((e^eps - 1 + q) / q) + 1/2, and delta(eps) = P[x > x*] - e^eps
    Q[x > x*] (the other direction is 0 once e^-eps < 1 - q). For q = 1 it is Balle and Wang's analytic
    Gaussian (2018). Every accountant's epsilon must be at least this: it is the truth for one step."""
    from scipy.optimize import brentq
    from scipy.special import log_ndtr

    def excess(eps: float) -> float:
        log_ratio = eps + math.log1p((q - 1) * math.exp(-eps)) - math.log(q)  # log((e^eps - 1 + q) / q)
        cut = sigma**2 * log_ratio + 0.5
        above_p = (1 - q) * math.exp(log_ndtr(-cut / sigma)) + q * math.exp(log_ndtr((1 - cut) / sigma))
        return above_p - math.exp(eps + log_ndtr(-cut / sigma)) - delta

    return float(brentq(excess, 1e-3, 1e5, xtol=1e-9, rtol=1e-12))


def test_the_tight_reference_matches_opacus_prv_where_prv_holds() -> None:
    """The reference above, against Opacus's PRV on one step at usual noise: PRV's upper bound, within its
    eps_error of 0.01 (so a wrong reference fails here, not silently below)."""
    prv = PRVAccountant()
    prv.history = [(1.0, 0.2, 1)]
    truth = tight_gaussian_epsilon(1.0, 0.2, 1e-5)
    assert truth <= prv.get_epsilon(delta=1e-5) <= truth + 0.021


@pytest.mark.parametrize(("sigma", "q"), [(0.05, 0.2), (0.05, 1.0), (0.07, 0.5)])
def test_one_step_at_tiny_noise_is_finite_and_tight(sigma: float, q: float) -> None:
    """One step at sigma 0.05-0.07: epsilon in the hundreds, at least the exact one, and close to it."""
    from fedtrain.privacy.accountants import epsilon

    truth = tight_gaussian_epsilon(sigma, q, 1e-5)
    ours = epsilon([(sigma, q, 1)], 1e-5, "prv")
    assert 100 < truth <= ours <= 1.06 * truth, (truth, ours)


@pytest.mark.parametrize("history", [[(0.05, 0.2, 8)], [(0.05, 0.2, 240)], [(0.05, 0.05, 6)], [(0.05, 1.0, 10)],
                                     [(0.05, 0.2, 240), (30.0, 1.0, 10)]])  # fmt: skip
def test_tiny_noise_compositions_have_a_finite_valid_epsilon(history: list[tuple[float, float, int]]) -> None:
    """Where Opacus's PRV would overflow float64 (it returns inf for sigma 0.05, q 0.2, 8 steps) or build a grid
    of gigabytes, the epsilon is still finite, never looser than Opacus's own RDP accountant (default orders),
    never below the truth for one step, and for q = 1 (k Gaussian steps are exactly one at sigma / sqrt(k))
    within 6% of the exact composed epsilon."""
    from fedtrain.privacy.accountants import epsilon

    ours = epsilon(history, 1e-5, "prv")
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert math.isfinite(ours)
    assert ours <= rdp.get_epsilon(delta=1e-5) * (1 + 1e-9)
    sigma, q, steps = history[0]
    assert ours >= tight_gaussian_epsilon(sigma, q, 1e-5)
    if len(history) == 1 and q == 1.0:
        truth = tight_gaussian_epsilon(sigma / math.sqrt(steps), 1.0, 1e-5)
        assert truth <= ours <= 1.06 * truth, (truth, ours)


@pytest.mark.parametrize("history", [[(1.0, 0.2, 240)], [(0.6, 0.125, 300), (50.0, 1.0, 60)], [(0.2, 0.2, 240)],
                                     [(0.05, 0.2, 240)], [(0.3, 1.0, 10)], [(0.05, 0.2, 2)]])  # fmt: skip
def test_the_prv_domain_bound_is_never_below_opacus_own(history: list[tuple[float, float, int]]) -> None:
    """The cheap domain bound that decides PRV vs RDP is never below the half-width Opacus itself would use, and
    its mesh is Opacus's (PRVAccountant._get_domain)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    from fedtrain.privacy.accountants import _prv_domain

    delta, eps_error = 1e-5, 0.01
    half = compute_safe_domain_size(prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                                    max_self_compositions=[n for *_, n in history], eps_error=eps_error,
                                    delta_error=delta / 1000)  # fmt: skip
    total = sum(n for *_, n in history)
    bound, mesh = _prv_domain(tuple(history), delta)
    assert bound >= half * (1 - 1e-9)
    assert mesh == pytest.approx(eps_error / math.sqrt(total * math.log(12 / (delta / 1000)) / 2), rel=1e-12)


def test_tiny_noise_is_accounted_in_bounded_memory_and_normal_noise_by_prv() -> None:
    """At sigma 0.05, q 0.2, 240 steps Opacus's PRV grid would hold 4.9e8 points (9-14 GB measured): the epsilon
    comes in little memory; at usual noise the number is PRV's own."""
    import tracemalloc

    from fedtrain.privacy.accountants import epsilon

    tracemalloc.start()
    try:
        ours = epsilon([(0.05, 0.2, 240)], 2e-5, "prv")  # a delta no other test caches
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ours > 1000 and math.isfinite(ours)
    assert peak < 200 * 2**20, peak
    usual = [(1.0, 0.2, 240)]
    prv = PRVAccountant()
    prv.history = list(usual)
    assert epsilon(usual, 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-9)


def test_a_huge_epsilon_travels_exactly_and_an_infinite_one_is_refused_in_words() -> None:
    """The client's privacy record carries a tiny-noise epsilon (tens of thousands) unchanged; one reporting
    inf is refused with what it means."""
    from fedtrain import protocol

    ledger = PrivacyLedger(delta=1e-5, entries=[LedgerEntry(0.05, 0.125, 80)], accountant="prv")
    huge = ledger.epsilon()
    assert 1000 < huge < math.inf
    back = protocol.read_privacy(protocol.privacy_record(protocol.PrivacyReport("client-0", ledger, huge, huge)))
    assert back.epsilon == huge and back.lifetime_epsilon == huge
    record = protocol.privacy_record(protocol.PrivacyReport("client-0", ledger, math.inf, None))
    with pytest.raises(ValueError, match="infinite epsilon: no privacy guarantee holds"):
        protocol.read_privacy(record)
