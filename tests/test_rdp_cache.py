"""Opacus's one-step RDP, cached per process (fedtrain/privacy/accountants.py): the same numbers as
Opacus's own formula, computed once, and computable ahead of time in a warm worker so that the tasks
it forks compute none."""

from __future__ import annotations

import math
import os

import pytest

from fedtrain.privacy import accountants


def _opacus_rdp(q: float, sigma: float, alpha: float) -> float:
    """Opacus's formula, not through the cached name: the log-moment of the sampled Gaussian / (alpha - 1)."""
    from opacus.accountants.analysis import rdp

    return rdp._compute_log_a(q, sigma, alpha) / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.1), (0.2222, 1.0), (0.5, 0.6)])
def test_cached_rdp_is_opacus_formula(q: float, sigma: float) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    accountants.make_accountant("rdp")  # installs the cache
    orders = RDPAccountant.DEFAULT_ALPHAS
    for _ in range(2):  # computed, then cached: the same numbers both times
        got = compute_rdp(q=q, noise_multiplier=sigma, steps=7, orders=orders)
        assert list(got) == pytest.approx([7 * _opacus_rdp(q, sigma, a) for a in orders], rel=1e-12)


def test_a_forked_process_computes_nothing_the_worker_warmed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm worker computes the pairs a task reported; a task forked after it accounts a whole new
    history (more steps: not in the epsilon cache) without computing a single RDP term."""
    from opacus.accountants.analysis import rdp

    q, sigma = 0.3137, 0.917  # a pair no other test uses: nothing of it is cached yet
    accountants.warm_rdp([[q, sigma], [1.0, 40.0]])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "task": count Opacus's computations of a log-moment
        os.close(read)
        calls = 0
        exact = rdp._compute_log_a

        def counted(*args: float) -> float:
            nonlocal calls
            calls += 1
            return exact(*args)

        rdp._compute_log_a = counted
        value = accountants.epsilon([(sigma, q, 57), (40.0, 1.0, 3)], 1e-5)
        os.write(write, f"{calls} {value}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        calls, value = pipe.read().split()
    os.waitpid(pid, 0)
    assert int(calls) == 0
    # and the number is the accountant's: the same history accounted here, cache or not
    accountants._epsilon.cache_clear()
    assert float(value) == pytest.approx(accountants.epsilon([(sigma, q, 57), (40.0, 1.0, 3)], 1e-5), rel=1e-12)
    assert math.isfinite(float(value)) and float(value) > 0


def test_the_pairs_reported_are_the_last_accounted_and_few() -> None:
    """A noise calibration tries dozens of sigmas: only the last few pairs go to the worker."""
    for i in range(30):
        accountants.epsilon([(0.8 + i / 100, 0.05, 10)], 1e-5)
    accountants.epsilon([(1.234, 0.1, 10)], 1e-5)
    pairs = accountants.rdp_pairs()
    assert len(pairs) <= 8
    assert pairs[-1] == [0.1, 1.234]


def test_invalid_pairs_are_skipped() -> None:
    accountants.warm_rdp([[0.0, 1.0], [2.0, 1.0], [0.1, -1.0], [0.1, math.inf]])  # nothing to compute, no error
