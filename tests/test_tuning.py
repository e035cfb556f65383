"""Private hyperparameter tuning (issue 14, item 3): its price on the ledger, checked against
Papernot and Steinke's bound computed independently here, against the exact Renyi divergence of a
tuning whose trials are randomized response, and end to end in simulation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy.optimize import minimize_scalar

from fedtrain import protocol
from fedtrain.errors import FedtrainError
from fedtrain.privacy.accountants import RDP_ORDERS, epsilon
from fedtrain.privacy.calibration import TOLERANCE, noise_for, tuned_noise_for, tuning_floor
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtrain.privacy.tuning import TrialCount, tuned_rdp

# ---------------------------------------------------------------- the paper's bound, written out here


def paper_mean(eta: float, gamma: float) -> float:
    """E[K] for K ~ D(eta, gamma), summed from the paper's probability mass function."""
    k = np.arange(1, 200_000, dtype=float)
    if eta == 0:
        mass = (1 - gamma) ** k / (k * math.log(1 / gamma))
    else:
        product = np.cumprod((k - 1 + eta) / k)  # prod_{l<k} (l + eta) / (l + 1), signed when eta < 0
        mass = (1 - gamma) ** k * product / (gamma**-eta - 1)
    return float(np.sum(k * mass))


def paper_epsilon_gaussian(sigma: float, steps: int, eta: float, gamma: float, delta: float) -> float:
    """Theorem 2 for a trial that is `steps` Gaussian mechanisms at `sigma` (RDP lambda*steps/(2 sigma^2)),
    minimised over continuous orders, then converted as Balle et al. (2020) Theorem 21."""
    rho = steps / (2 * sigma**2)
    # (1+eta)[(lambda_hat - 1) rho + log(1/gamma)/lambda_hat] is smallest at sqrt(log(1/gamma)/rho), or at 1
    best_hat = max(1.0, math.sqrt(math.log(1 / gamma) / rho))
    selection = (1 + eta) * ((best_hat - 1) * rho + math.log(1 / gamma) / best_hat)
    log_mean = math.log(paper_mean(eta, gamma))

    def converted(order: float) -> float:
        rdp = order * rho + selection + log_mean / (order - 1)
        return rdp + math.log((order - 1) / order) - (math.log(delta) + math.log(order)) / (order - 1)

    return float(minimize_scalar(converted, bounds=(1.0001, 4096), method="bounded", options={"xatol": 1e-6}).fun)


@pytest.mark.parametrize(
    ("sigma", "steps", "eta", "expected"),
    [(20.0, 100, 0.0, 8.0), (40.0, 300, 1.0, 5.0), (8.0, 10, 0.5, 20.0), (60.0, 1000, -0.5, 3.0)],
)
def test_the_ledger_accounts_a_tuning_as_the_paper_bounds_it(sigma, steps, eta, expected) -> None:
    delta = 1e-5
    trials = TrialCount.with_mean(expected, eta)
    assert paper_mean(eta, trials.gamma) == pytest.approx(expected, rel=1e-6)
    ledger = PrivacyLedger(delta, [LedgerEntry.tuning(sigma, 1.0, steps, trials)], "prv")
    ours = ledger.epsilon()
    reference = paper_epsilon_gaussian(sigma, steps, eta, trials.gamma, delta)
    # our orders are a grid: never below the continuous optimum, and close to it
    assert reference <= ours <= reference * 1.02 + 1e-3, (ours, reference)


def test_a_tuning_costs_more_than_one_trial_and_less_than_all_its_trials() -> None:
    trials, delta = TrialCount.with_mean(8.0, 0.0), 1e-5
    one = epsilon([(1.2, 0.1, 500)], delta, "rdp")
    tuned = epsilon([], delta, "rdp", [(1.2, 0.1, 500, trials.eta, trials.gamma)])
    composed = epsilon([(1.2, 0.1, 500 * 8)], delta, "rdp")
    assert one < tuned < composed


# ---------------------------------------------------------------- the bound holds: an exact tuning


def _pgf(eta: float, gamma: float, x: float) -> float:
    """E[x^K] from the paper's mass function, summed directly."""
    k = np.arange(1, 100_000, dtype=float)
    if eta == 0:
        mass = (1 - gamma) ** k / (k * math.log(1 / gamma))
    else:
        mass = (1 - gamma) ** k * np.cumprod((k - 1 + eta) / k) / (gamma**-eta - 1)
    return float(np.sum(mass * x**k))


def _renyi(p: float, q: float, order: float) -> float:
    """D_order(Bernoulli(p) || Bernoulli(q))."""
    return math.log(p**order * q ** (1 - order) + (1 - p) ** order * (1 - q) ** (1 - order)) / (order - 1)


@pytest.mark.parametrize(("eta", "expected"), [(0.0, 10.0), (1.0, 10.0), (0.5, 4.0), (-0.5, 3.0)])
def test_the_bound_holds_for_a_tuning_computed_exactly(eta, expected) -> None:
    """Trials are randomized response (one bit, scored by itself): the best of K is 1 unless every trial
    says 0, so its output law is exact from K's generating function. Its true Renyi divergence must
    stay under the bound at every order, in both directions."""
    trials = TrialCount.with_mean(expected, eta)
    p = math.exp(0.5) / (1 + math.exp(0.5))  # epsilon_0 = 0.5
    orders = np.asarray([o for o in RDP_ORDERS if o <= 64])
    base = np.asarray([max(_renyi(p, 1 - p, o), _renyi(1 - p, p, o)) for o in orders])
    bound = tuned_rdp(base, orders, trials)
    best_of = {x: 1 - _pgf(eta, trials.gamma, 1 - x) for x in (p, 1 - p)}  # P[best is 1]
    for order, limit in zip(orders, bound, strict=True):
        exact = max(_renyi(best_of[p], best_of[1 - p], order), _renyi(best_of[1 - p], best_of[p], order))
        assert exact <= limit + 1e-9, (order, exact, limit)


def test_the_trial_count_is_drawn_from_its_distribution() -> None:
    for eta, expected in [(0.0, 8.0), (1.0, 8.0), (-0.5, 3.0)]:
        trials = TrialCount.with_mean(expected, eta)
        assert sum(trials.pmf(k) for k in range(1, 100_000)) == pytest.approx(1.0, abs=1e-9)
        draws = np.asarray([trials.sample(np.random.default_rng(seed)) for seed in range(4000)])
        assert draws.min() >= 1
        spread = draws.std() / math.sqrt(len(draws))
        assert abs(draws.mean() - expected) < 5 * spread, (eta, draws.mean())
    geometric = TrialCount(1.0, 0.25)
    assert [geometric.pmf(k) for k in (1, 2, 3)] == pytest.approx([0.25, 0.25 * 0.75, 0.25 * 0.75**2])


# ---------------------------------------------------------------- calibration and refusal


def test_noise_is_calibrated_so_that_the_whole_tuning_spends_the_target() -> None:
    trials, delta = TrialCount.with_mean(6.0, 0.0), 1e-5
    sigma = tuned_noise_for(3.0, delta, 0.2, 150, trials)
    spent = PrivacyLedger(delta, [LedgerEntry.tuning(sigma, 0.2, 150, trials)]).epsilon()
    assert 3.0 - TOLERANCE < spent <= 3.0
    assert sigma > noise_for(3.0, delta, 0.2, 150, "rdp")  # tuning costs more noise than one run


def test_a_tuning_whose_overhead_alone_exceeds_the_budget_is_refused() -> None:
    trials = TrialCount.with_mean(8.0, 1.0)
    floor = tuning_floor(1e-5, trials)
    assert 0 < floor < 0.1
    with pytest.raises(FedtrainError, match="alone costs epsilon .* before any training"):
        tuned_noise_for(floor * 0.9, 1e-5, 0.2, 150, trials)


def test_a_tuning_entry_survives_the_wire_and_storage() -> None:
    trials = TrialCount.with_mean(5.0, 1.0)
    entry = LedgerEntry.tuning(7.0, 0.1, 200, trials)
    ledger = PrivacyLedger(1e-5, [entry, LedgerEntry.release(30.0)], "rdp")
    assert PrivacyLedger.from_dict(ledger.to_dict()).entries == ledger.entries
    report = protocol.read_privacy(protocol.privacy_record(protocol.PrivacyReport("c", ledger, ledger.epsilon())))
    assert report.ledger.entries == ledger.entries
    with pytest.raises(FedtrainError, match="damaged"):
        PrivacyLedger.from_dict({**ledger.to_dict(), "entries": [{**entry.to_dict(), "gamma": 1.5}]})


def test_a_real_client_refuses_a_tuning(tmp_path: Path) -> None:
    """Only the best trial may leave: a federation's server sees every trial, so a kit's client refuses."""
    from tests.hostile import initial_weights, provision_clients, run_config

    (client,) = provision_clients(tmp_path, 1)
    config = run_config(metrics="none", tuning_trials=4.0, tuning_id="abc")
    reply = protocol.read_reply(client.send("train", config, initial_weights(config)))
    assert reply.kind == "refused" and reply.refusal_kind == protocol.POLICY
    assert "tuning runs only in simulation" in reply.reason


def test_the_cli_refuses_a_tuning_over_budget_before_anything_is_made(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedtrain.cli", "tune", "--target-epsilon", "0.001", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "alone costs epsilon" in done.stderr and "Traceback" not in done.stderr
    assert not run_dir.exists()


# ---------------------------------------------------------------- end to end


@pytest.mark.own_process  # starts Ray in-process (tests/conftest.py)
@pytest.mark.timeout(600)
def test_tune_end_to_end_in_simulation(tmp_path: Path) -> None:
    """Two trials (a fixed generator, as only tests may), each client charged once, the total in
    privacy.json, nothing of the losing trial left, every report intact."""
    import fedtrain
    from fedtrain.security.keys import generate_key, load_model_key, write_key_file
    from fedtrain.server.report import write_report
    from fedtrain.server.verification import require_intact_reports
    from fedtrain.tuning import TUNING_JSON, SearchSpace

    generator = np.random.default_rng(0)
    trials = TrialCount.with_mean(2.0, 0.0)
    assert trials.sample(np.random.default_rng(0)) == 2  # what this generator draws first
    space = SearchSpace(lr=(0.5, 2.0), max_grad_norm=(1.0,))
    write_key_file(tmp_path / "model.key", generate_key())
    result = fedtrain.tune(
        "digits", clients=2, rounds=2, target_epsilon=3.0, expected_trials=2.0, space=space,
        run_dir=tmp_path / "run", key_file=tmp_path / "model.key", rng=generator,
    )  # fmt: skip
    assert result.chosen in space.candidates() and result.test and 0.3 < result.test["accuracy"] <= 1.0
    privacy = json.loads((result.run_dir / "privacy.json").read_text())
    for info in privacy["clients"].values():
        assert [e["kind"] for e in info["ledger"]] == ["tuning"]  # charged once for both trials
        total = PrivacyLedger.from_dict({**info, "entries": info["ledger"]}).epsilon()
        entry, single = info["ledger"][0], RDPAccountant()
        single.history = [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])]
        assert single.get_epsilon(info["delta"]) < total  # the selection is paid for: more than one trial
        assert 3.0 - TOLERANCE < total <= 3.0 and info["epsilon"] == pytest.approx(total)
    report = json.loads((result.run_dir / TUNING_JSON).read_text())
    assert report["chosen"] == result.chosen and "trials" not in json.dumps(report["chosen"])
    assert not any(p.name.startswith(".trials-") for p in result.run_dir.iterdir())
    require_intact_reports(result.run_dir, load_model_key(str(tmp_path / "model.key")))
    page = write_report(result.run_dir, load_model_key(str(tmp_path / "model.key")), tmp_path / "r.html").path
    assert "1 private tuning(s)" in page.read_text(encoding="utf-8")  # the card names the tuning it paid for
    with pytest.raises(FedtrainError, match="belong to `fedtrain tune`"):
        fedtrain.simulate("digits", clients=2, rounds=1, tuning_trials=2.0, tuning_id="x",
                          metrics="none")  # fmt: skip
