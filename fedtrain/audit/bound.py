"""From correct guesses to a lower bound on epsilon: the theorem of Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run" (NeurIPS 2023), for (epsilon, delta)-DP.

m canaries are each included with probability 1/2, independently; an auditor guesses inclusion or
exclusion for r of them and is right v times. If the training is (epsilon, delta)-DP, the number of
correct guesses is stochastically dominated by a Binomial(r, p) with p = e^eps / (1 + e^eps), up to a
delta term (their Theorem 5.2):

    P[correct >= v] <= beta + 2 m delta alpha,
    beta  = P[Binomial(r, p) >= v],
    alpha = max over i = 1..v of P[v - i <= Binomial(r, p) < v] / i.

The right-hand side is the p-value of the claim "(epsilon, delta)-DP" given v; it grows with epsilon.
The lower bound at a confidence c is the largest epsilon whose p-value stays at most 1 - c: every
smaller epsilon is rejected at that confidence. Exact binomial sums from log probabilities (numpy; no scipy).
"""

from __future__ import annotations

import math

import numpy as np

from fedtrain.errors import FedtrainError

SEARCH_ITERATIONS = 60  # bisection on epsilon: 2^-60 of the bracket, far below any digit reported


def _log_binomial_pmf(r: int, log_p: float, log_q: float) -> np.ndarray:
    """log P[Binomial(r, p) = k] for k = 0..r, with log_p = log p and log_q = log(1 - p): from
    log P[0] = r log q and the ratio P[k + 1] / P[k] = (r - k) / (k + 1) * p / q."""
    k = np.arange(r, dtype=np.float64)
    steps = np.log(r - k) - np.log(k + 1) + (log_p - log_q)
    return r * log_q + np.concatenate([[0.0], np.cumsum(steps)])


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The p-value of "(epsilon, delta)-DP" after `correct` of `guesses` guesses on `m` canaries.

    Args:
        m: canaries, each included with probability 1/2.
        guesses: guesses made (the others abstained), 0 <= guesses <= m.
        correct: correct guesses, 0 <= correct <= guesses.
        epsilon: the claim's epsilon, >= 0.
        delta: the claim's delta, in [0, 1].

    Returns:
        An upper bound on the probability of at least `correct` correct guesses under the claim, at most 1.

    Raises:
        FedtrainError: the counts or the claim are out of range.
    """
    if not 0 <= correct <= guesses <= m:
        raise FedtrainError(f"an audit needs 0 <= correct <= guesses <= canaries, not {correct}, {guesses}, {m}.")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise FedtrainError(f"a DP claim needs epsilon >= 0 and delta in [0, 1], not {epsilon} and {delta}.")
    if correct == 0:
        return 1.0
    # p = e^eps / (1 + e^eps), in logs without overflow for large epsilon
    log_p, log_q = -math.log1p(math.exp(-epsilon)), -epsilon - math.log1p(math.exp(-epsilon))
    pmf = _log_binomial_pmf(guesses, log_p, log_q)
    top = pmf.max()
    beta = float(np.exp(pmf[correct:] - top).sum() * math.exp(top))
    # alpha = max over i of P[correct - i <= B < correct] / i: the window's sums, growing downwards from correct - 1
    below = np.cumsum(np.exp(pmf[:correct][::-1] - top)) * math.exp(top)
    alpha = float((below / np.arange(1, correct + 1)).max())
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float) -> float:
    """The largest epsilon that `correct` of `guesses` guesses on `m` canaries reject at `confidence`.

    Args:
        m: canaries, each included with probability 1/2.
        guesses: guesses made.
        correct: correct guesses.
        delta: the delta of the claims tested.
        confidence: e.g. 0.95; every epsilon below the bound is rejected with at most 1 - confidence error.

    Returns:
        The lower bound on epsilon (0 when even epsilon = 0 is not rejected).

    Raises:
        FedtrainError: counts out of range or a confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise FedtrainError(f"the confidence must be in (0, 1), not {confidence}.")
    significance = 1 - confidence
    if p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, guesses, correct, high, delta) <= significance:  # bounded: the p-value -> 1 as eps grows
        low, high = high, high * 2
        if high > 1e4:  # every guess right is still a finite bound; this is far past any
            return low
    for _ in range(SEARCH_ITERATIONS):
        middle = (low + high) / 2
        if p_value(m, guesses, correct, middle, delta) <= significance:
            low = middle
        else:
            high = middle
    return low


__all__ = ["epsilon_lower_bound", "p_value"]
