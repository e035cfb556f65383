"""Metrics computed on private data, released through the Gaussian mechanism.

Each example contributes a vector of K values, each clipped to [0, its bound] and scaled to [0, 1];
the release is the vector of sums plus Gaussian noise, divided by the (public) number of examples.
Adding or removing one example moves the sums by a vector of L2 norm at most sqrt(K), so noise of
standard deviation sigma * sqrt(K) per coordinate is the Gaussian mechanism with noise multiplier
sigma: one ledger entry (sigma, q = 1, 1 step). The noisy mean is then clipped back into its range,
which is post-processing and costs nothing. The noise comes from a generator seeded by the OS's
CSPRNG, never from a seed anyone else knows.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from fedtrain.privacy.ledger import LedgerEntry


@dataclass(frozen=True)
class Release:
    """Released means (in the metrics' own units), the noise's standard deviation on each (public:
    it follows from sigma, the bounds and the count), and the ledger entry that pays for it."""

    means: np.ndarray
    std: np.ndarray
    entry: LedgerEntry | None


def private_means(values: np.ndarray, bounds: np.ndarray, noise_multiplier: float) -> Release:
    """Release the per-column means of `values` with the Gaussian mechanism.

    Args:
        values: (n, K) per-example values; column k is clipped to [0, bounds[k]].
        bounds: (K,) the largest value each column counts.
        noise_multiplier: sigma, relative to the L2 sensitivity sqrt(K) of the scaled sums.

    Returns:
        The Release (means clipped to [0, bound]).
    """
    values, bounds = np.asarray(values, dtype=np.float64), np.asarray(bounds, dtype=np.float64)
    count, width = values.shape
    scaled = np.clip(values / bounds, 0.0, 1.0)
    generator = np.random.Generator(np.random.PCG64DXSM(secrets.randbits(128)))
    sd = noise_multiplier * np.sqrt(width)
    noisy = (scaled.sum(axis=0) + generator.normal(0.0, sd, size=width)) / max(count, 1)
    return Release(
        np.clip(noisy, 0.0, 1.0) * bounds, sd / max(count, 1) * bounds, LedgerEntry.release(noise_multiplier)
    )


def exact_means(values: np.ndarray, bounds: np.ndarray) -> Release:
    """The plain means (metrics "plain"): no noise, no entry: outside the guarantee."""
    values = np.asarray(values, dtype=np.float64)
    return Release(values.mean(axis=0), np.zeros(values.shape[1]), None)
