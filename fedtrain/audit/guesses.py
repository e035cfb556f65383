"""From canary scores to guesses, and from guesses to the audit's bound.

The auditor ranks the canaries by score (higher: more likely included), guesses "included" for the
k/2 highest and "excluded" for the k/2 lowest, and abstains on the rest (Steinke, Nasr and Jagielski's
Algorithm 1). Which k is best depends on how strong the signal is, and k is not known before the
scores are: a few counts, fixed in advance, are each tested at (1 - confidence) / their number
(Bonferroni), so the best of them holds at the stated confidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedtrain.audit.bound import epsilon_lower_bound
from fedtrain.errors import FedtrainError

GUESS_SHARES = (0.05, 0.1, 0.2, 0.5, 1.0)  # of the canaries guessed on; the rest abstain


@dataclass(frozen=True)
class Guesses:
    """One set of guesses: how many, how many right, and the bound they give."""

    guesses: int
    correct: int
    epsilon_lower: float


def guess_counts(m: int) -> list[int]:
    """The guess counts tried for `m` canaries: even (half "in", half "out"), distinct, at least 2."""
    return sorted({min(m - m % 2, max(2, 2 * round(m * share / 2))) for share in GUESS_SHARES})


def correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Correct guesses when the top `guesses`/2 scores are guessed in and the bottom `guesses`/2 out."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    half = guesses // 2
    guessed_in, guessed_out = order[:half], order[len(order) - (guesses - half) :]
    return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


def best_guesses(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> tuple[Guesses, list[Guesses]]:
    """The guess count with the largest bound, and every count tried.

    Args:
        scores: one per canary, higher meaning "more likely included".
        included: whether each canary was included (the truth the guesses are checked against).
        delta: the delta of the DP claims tested.
        confidence: the confidence of the reported bound (the counts share its error, Bonferroni).

    Returns:
        (the best Guesses, all Guesses tried).

    Raises:
        FedtrainError: fewer than two canaries, or scores and inclusions of different lengths.
    """
    m = len(included)
    if m < 2 or len(scores) != m or not np.isfinite(scores).all():
        raise FedtrainError(f"an audit needs finite scores for at least two canaries, not {len(scores)} of {m}.")
    included = np.asarray(included, dtype=bool)
    counts = guess_counts(m)
    per_count = 1 - (1 - confidence) / len(counts)
    tried = []
    for count in counts:
        correct = correct_guesses(scores, included, count)
        tried.append(Guesses(count, correct, epsilon_lower_bound(m, count, correct, delta, per_count)))
    return max(tried, key=lambda g: g.epsilon_lower), tried


def as_dicts(tried: list[Guesses]) -> list[dict[str, float]]:
    return [asdict(g) for g in tried]


__all__ = ["GUESS_SHARES", "Guesses", "as_dicts", "best_guesses", "correct_guesses", "guess_counts"]
