"""Client-level (central) DP: Flower's server-side clipping and noise through fedtrain's real server
loop (the controlled in-process grid of test_strategies), checked against independent references:

- the reported client-level epsilon against Opacus's RDP accountant and against the closed-form RDP
  of the Gaussian mechanism on a dense grid of orders, for the same noise, sampling and rounds;
- the released model against the uniform mean of updates clipped here, and the added noise's
  standard deviation against sigma * C / n;
- a run whose planned rounds exceed max_client_epsilon refuses to start, naming the rounds that fit.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.strategies import make_strategy
from tests.conftest import run_cli
from tests.test_strategies import NODES, ControlledGrid, run, task_identity, update  # noqa: F401 (fixture)

SIGMA, CLIP = 1.3, 0.5
WIDE = {"input_shape": [200], "num_classes": 10}  # 2010 parameters: enough to measure the noise's spread


def opacus_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Opacus's RDP accountant; every client takes part in every round (sampling rate 1)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
    rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=rounds, orders=orders)
    return opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def closed_form_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """RDP of the Gaussian mechanism, rounds * a / (2 sigma^2), converted at delta (Canonne et al. 2020)."""
    a = np.linspace(1.001, 3000, 1_000_000)
    return float(np.min(rounds * a / (2 * sigma**2) + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)))


def clipped(d: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    return {k: v.astype(np.float64) * min(1.0, bound / norm) for k, v in d.items()}


def test_client_level_epsilon_matches_independent_accountants(tmp_path) -> None:
    grid, rows = run(tmp_path, "fedavg", rounds=4, central_dp="fixed", central_noise_multiplier=SIGMA)
    delta = 1e-5  # the default: min(1e-5, 1 / (10 * clients))
    for row in rows:
        assert row["client_epsilon"] == pytest.approx(opacus_epsilon(SIGMA, row["round"], delta), rel=1e-3)
        assert row["client_epsilon"] == pytest.approx(closed_form_epsilon(SIGMA, row["round"], delta), rel=5e-3)
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())["client_level"]
    assert report["released_rounds"] == [1, 2, 3, 4]
    assert (report["noise_multiplier"], report["delta"], report["population"]) == (SIGMA, delta, NODES)
    assert report["epsilon"] == pytest.approx(opacus_epsilon(SIGMA, 4, delta), rel=1e-3)


def test_release_is_the_uniform_mean_of_clipped_updates_plus_noise_of_sigma_c_over_n(tmp_path) -> None:
    grid, rows = run(tmp_path, "fedavg", central_dp="fixed", central_noise_multiplier=SIGMA,
                     central_clipping_norm=CLIP, **WIDE)  # fmt: skip
    residuals = []
    for server_round in (1, 2):
        ws = {k: v.astype(np.float64) for k, v in grid.sent[server_round].items()}
        ds = [clipped(update(server_round, n, {k: v.shape for k, v in ws.items()}), CLIP) for n in range(1, NODES + 1)]
        mean = {k: ws[k] + sum(d[k] for d in ds) / NODES for k in ws}  # uniform: the data sizes differ
        released = grid.sent[server_round + 1]
        residuals.append(np.concatenate([(released[k] - mean[k]).ravel() for k in ws]))
    noise = np.concatenate(residuals)
    assert abs(noise.mean()) < 4 * SIGMA * CLIP / NODES / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(SIGMA * CLIP / NODES, rel=0.06)  # 4020 draws: 6% is > 5 standard errors


def test_a_round_missing_an_update_is_not_released_and_costs_nothing(tmp_path) -> None:
    grid, rows = run(tmp_path, "fedavg", rounds=2, grid=ControlledGrid(bad={3: "nan"}), central_dp="fixed")
    assert [row["clients_failed"] for row in rows] == [1, 1]
    assert [row["client_epsilon"] for row in rows] == [0.0, 0.0]
    for key, value in grid.sent[1].items():
        np.testing.assert_array_equal(grid.sent[2][key], value)  # the model stayed as it was
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())["client_level"]
    assert report["released_rounds"] == []


@pytest.mark.parametrize("start", [0.01, 100.0])
def test_adaptive_clipping_moves_the_bound_towards_the_updates_and_is_accounted(tmp_path, start) -> None:
    # Update norms are about 0.5..1.2 * sqrt(15): a bound far below them (every update clipped) must
    # grow each round, one far above (none clipped) must shrink (Andrew et al. 2021).
    grid, rows = run(tmp_path, "fedavg", rounds=3, central_dp="adaptive", central_noise_multiplier=SIGMA,
                     central_clipping_norm=start, central_clip_lr=0.5)  # fmt: skip
    norms = [start] + [row["client_clipping_norm"] for row in rows]
    moves = np.diff(norms) if start < 1 else -np.diff(norms)
    assert (moves > 0).all(), norms
    assert rows[-1]["client_epsilon"] == pytest.approx(opacus_epsilon(SIGMA, 3, 1e-5), rel=1e-3)


def test_planned_rounds_over_max_client_epsilon_refuse_to_start(tmp_path) -> None:
    limit = 8.0
    config = Config(clients=NODES, rounds=20, input_shape=[4], num_classes=3, central_dp="fixed",
                    central_noise_multiplier=SIGMA, max_client_epsilon=limit)  # fmt: skip
    fits = max(k for k in range(21) if k == 0 or opacus_epsilon(SIGMA, k, 1e-5) <= limit)
    with pytest.raises(FedtrainError, match=f"above max_client_epsilon = 8; run at most {fits} rounds"):
        make_strategy(config)
    make_strategy(config.replace(rounds=fits))  # the rounds that fit do start


def test_client_level_dp_needs_a_mean(tmp_path) -> None:
    with pytest.raises(FedtrainError, match="strategy 'median' is not a mean"):
        make_strategy(Config(clients=NODES, strategy="median", central_dp="adaptive"))


def test_cli_refuses_a_run_over_max_client_epsilon(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = ["simulate", "--central-dp", "fixed", "--max-client-epsilon", "1", "--run-dir", str(run_dir)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "above max_client_epsilon = 1; raise central_noise_multiplier." in err
    assert not run_dir.exists()


def test_noise_does_not_come_from_numpys_global_generator(tmp_path) -> None:
    """Flower draws it from np.random, which any code can seed; fedtrain's is private: two runs from
    the same NumPy seed release different models."""
    released = []
    for name in ("a", "b"):
        np.random.seed(0)
        grid, _ = run(tmp_path / name, "fedavg", rounds=2, central_dp="fixed")
        released.append(np.concatenate([v.ravel() for v in grid.sent[2].values()]))
    assert not np.allclose(released[0], released[1])
