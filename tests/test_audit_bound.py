"""The audit's arithmetic against the theorem of Steinke, Nasr and Jagielski (NeurIPS 2023), computed
here independently with scipy, and the bound's promise checked on mechanisms whose epsilon is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from fedtrain.audit.bound import epsilon_lower_bound, p_value
from fedtrain.audit.guesses import best_guesses, correct_guesses, guess_counts
from fedtrain.errors import FedtrainError


def paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2: P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_i P[v - i <= Binomial(r, p) < v] / i,
    p = e^eps / (1 + e^eps); every term from scipy's binomial distribution."""
    p = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(v - 1, r, p)
    i = np.arange(1, v + 1)
    window = (stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i
    return min(1.0, tail + 2 * m * delta * float(window.max(initial=0.0)))


def paper_epsilon(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The epsilon where the p-value crosses 1 - confidence (scipy's root finder on the paper's p-value)."""
    significance = 1 - confidence
    if paper_p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    return optimize.brentq(lambda eps: paper_p_value(m, r, v, eps, delta) - significance, 0.0, 50.0, xtol=1e-10)


# (m canaries, r guesses, v correct, delta, confidence)
TABLE = [
    (1000, 100, 100, 0.0, 0.95),
    (1000, 100, 90, 1e-5, 0.95),
    (1000, 1000, 700, 1e-5, 0.95),
    (660, 660, 660, 1e-5, 0.99),
    (660, 330, 300, 1e-5, 0.95),
    (200, 40, 35, 1e-6, 0.95),
    (100, 100, 75, 0.0, 0.9),
    (5000, 500, 420, 1e-5, 0.95),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence"), TABLE)
def test_the_bound_is_the_papers_theorem(m: int, r: int, v: int, delta: float, confidence: float) -> None:
    expected = paper_epsilon(m, r, v, delta, confidence)
    assert expected > 0.1  # every row of the table rejects some epsilon
    assert epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(expected, abs=1e-6)
    for eps in (0.0, 0.5 * expected, expected, 2 * expected):
        assert p_value(m, r, v, eps, delta) == pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_every_guess_right_with_delta_zero_has_a_closed_form() -> None:
    """r of r right, delta 0: p^r = 1 - confidence, so epsilon = log(p / (1 - p)) with p = (1 - c)^(1/r)."""
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), abs=1e-9)


def test_no_better_than_chance_proves_nothing() -> None:
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(100, 10, 0, 1e-5, 0.95) == 0.0


def test_out_of_range_counts_are_one_sentence() -> None:
    with pytest.raises(FedtrainError, match="correct <= guesses <= canaries"):
        p_value(10, 20, 5, 1.0, 0.0)
    with pytest.raises(FedtrainError, match="confidence"):
        epsilon_lower_bound(10, 10, 10, 0.0, 1.5)


def test_guesses_take_the_top_as_in_and_the_bottom_as_out() -> None:
    included = np.array([True, True, False, False, True, False])
    scores = np.array([5.0, 4.0, -3.0, -2.0, 0.1, 0.0])
    assert correct_guesses(scores, included, 4) == 4  # 5, 4 in; -3, -2 out
    assert correct_guesses(-scores, included, 4) == 0
    assert guess_counts(1000) == [50, 100, 200, 500, 1000]
    assert all(c % 2 == 0 and c >= 2 for c in guess_counts(7))


def _randomized_response(rng: np.random.Generator, m: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """An eps-DP mechanism on each bit, exactly: report the bit with probability e^eps / (1 + e^eps).
    Scores: the report plus a little noise to break ties (post-processing, so still eps-DP)."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    reported = np.where(truthful, included, ~included)
    return reported + 0.01 * rng.random(m), included


def test_the_bound_is_rarely_above_a_true_epsilon() -> None:
    """The promise itself, on a mechanism whose epsilon is known (randomized response, eps = 1): at 95%
    confidence the bound may pass 1 in at most 5% of runs. 400 runs here; more than 36 above (the 99.9%
    quantile of Binomial(400, 0.05)) would mean the arithmetic or the guessing is wrong."""
    rng = np.random.default_rng(20)
    above = 0
    for _ in range(400):
        scores, included = _randomized_response(rng, 400, 1.0)
        best, _ = best_guesses(scores, included, 0.0, 0.95)
        above += best.epsilon_lower > 1.0
    assert above <= 36


def test_the_bound_finds_a_large_epsilon() -> None:
    """Power: randomized response with eps = 6 on 1000 canaries is shown to be far from eps = 3."""
    rng = np.random.default_rng(21)
    scores, included = _randomized_response(rng, 1000, 6.0)
    best, tried = best_guesses(scores, included, 1e-5, 0.95)
    assert best.epsilon_lower > 4.0
    assert best == max(tried, key=lambda g: g.epsilon_lower) and len(tried) == 5
