"""The rules that choose a client's local DP-SGD settings (fedtrain/training_defaults.py), and their
path into the client's plan."""

from __future__ import annotations

import math

import pytest

from fedtrain import training_defaults as td
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.calibration import plan_run


def sigma_for(config: Config, num_samples: int):
    """The client's calibration (RDP, 60 metric releases as in a default run)."""

    def sigma(rate: float, steps_per_round: int) -> float:
        return plan_run(
            target_epsilon=config.privacy.target_epsilon,
            noise_multiplier=None,
            metrics_share=0.05,
            releases=2 * config.federation.rounds,
            sample_rate=rate,
            steps_per_round=steps_per_round,
            rounds=config.federation.rounds,
            delta=1e-5,
            accountant="rdp",
            settings="",
        ).noise_multiplier

    return sigma


def resolve(num_samples: int, **flat) -> td.LocalTraining:
    config = Config(**flat).validate()
    return td.resolve(config, num_samples, sigma_for=sigma_for(config, num_samples))


def quick(num_samples: int, **flat) -> td.LocalTraining:
    return td.resolve(Config(**flat).validate(), num_samples, sigma_for=linear_regime)


def test_given_values_are_used_as_given() -> None:
    local = quick(800, lr=0.3, batch_size=64, local_epochs=3, max_grad_norm=2.0)
    assert (local.lr, local.batch_size, local.local_epochs, local.max_grad_norm) == (0.3, 64, 3, 2.0)
    assert local.chosen == ()


def test_unset_values_are_chosen_and_named() -> None:
    local = quick(800, lr=0.3)
    assert local.lr == 0.3
    assert set(local.chosen) == {"batch_size", "local_epochs", "max_grad_norm"}


@pytest.mark.parametrize("model", ["logistic", "mlp", "cnn", "my_models:net"])
def test_each_family_has_its_rules(model: str) -> None:
    local = quick(800, model=model)
    fam = td.family(model)
    assert local.local_epochs == td.LOCAL_EPOCHS[fam]
    assert local.max_grad_norm == td.MAX_GRAD_NORM
    rate = 1 / td.steps_per_epoch(800, local.batch_size)
    assert local.lr == pytest.approx(td.EPOCH_STEP[fam] * rate)  # the same progress per epoch, whatever B


def test_batch_is_the_smallest_whose_noise_reaches_the_target() -> None:
    """Rule 3: sigma at the chosen batch is at least SIGMA_TARGET (unless the batch is the largest allowed);
    one more step per epoch would fall below it (unless the batch is the smallest allowed)."""
    for n, eps in ((300, 3.0), (855, 8.0), (4000, 3.0)):
        config = Config(target_epsilon=eps).validate()
        sigma = sigma_for(config, n)
        local = td.resolve(config, n, sigma_for=sigma)
        epochs = local.local_epochs
        steps = td.steps_per_epoch(n, local.batch_size)
        if 1 / steps < td.MAX_SAMPLE_RATE:
            assert sigma(1 / steps, steps * epochs) >= td.SIGMA_TARGET
        if steps < n // td.MIN_BATCH:
            assert sigma(1 / (steps + 1), (steps + 1) * epochs) < td.SIGMA_TARGET


def linear_regime(rate: float, steps: int) -> float:
    """sigma proportional to q sqrt(T), as the accountant gives for large sigma (a stand-in, fast)."""
    return 6.0 * rate * math.sqrt(steps)


def test_more_examples_or_more_epsilon_give_larger_batches() -> None:
    config = Config().validate()
    assert (
        td.resolve(config, 300, sigma_for=linear_regime).batch_size
        < td.resolve(config, 4000, sigma_for=linear_regime).batch_size
    )
    assert resolve(855, target_epsilon=1.0).batch_size < resolve(855, target_epsilon=8.0).batch_size


def test_defaults_stay_inside_a_default_client_policy() -> None:
    """Sample rate at most 0.5 and noise at least 0.5 (privacy/policy.py), for few and many examples."""
    for n, eps in ((20, 3.0), (100, 10.0), (10_000, 10.0)):
        config = Config(target_epsilon=eps).validate()
        sigma = sigma_for(config, n)
        local = td.resolve(config, n, sigma_for=sigma)
        steps = td.steps_per_epoch(n, local.batch_size)
        assert 1 / steps <= 0.5
        assert sigma(1 / steps, steps * local.local_epochs) >= 0.5


def test_a_fixed_noise_multiplier_takes_the_largest_batch() -> None:
    local = td.resolve(Config(noise_multiplier=1.0).validate(), 800)
    assert local.batch_size == 800 * td.MAX_SAMPLE_RATE


def test_no_training_example_is_an_error() -> None:
    with pytest.raises(FedtrainError, match="no training example"):
        td.resolve(Config().validate(), 0)


def test_settings_round_trip_through_the_plan() -> None:
    local = quick(800)
    assert td.LocalTraining.from_dict(local.to_dict()) == local
