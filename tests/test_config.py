"""One config: defaults < TOML < command line; every bad value is one sentence."""

from __future__ import annotations

import pytest

from fedtrain.config import Config, resolve
from fedtrain.errors import FedtrainError


def test_cli_overrides_file_which_overrides_defaults(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nclients = 3\nmodel = "cnn"\n')
    config = resolve(path, {"rounds": 2, "clients": None})
    assert (config.rounds, config.clients, config.model) == (2, 3, "cnn")
    assert config.batch_size == Config().batch_size


def test_dashed_keys_and_a_fedtrain_table_are_accepted(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[fedtrain]\nbatch-size = 16\n")
    assert resolve(path, {}).batch_size == 16


def test_choosing_noise_multiplier_switches_off_the_target(tmp_path) -> None:
    assert resolve(None, {"noise_multiplier": 1.1}).target_epsilon is None
    path = tmp_path / "run.toml"
    path.write_text("noise_multiplier = 0.8\n")
    assert resolve(path, {}).target_epsilon is None
    assert resolve(path, {"target_epsilon": 2.0}).noise_multiplier is None


def test_run_config_round_trip() -> None:
    config = Config(labels=["a", "b"], input_shape=[1, 8, 8], noise_multiplier=1.0, target_epsilon=None)
    restored = Config.from_run_config(config.to_run_config())
    assert restored == config
    assert all(isinstance(v, (str, int, float, bool)) for v in config.to_run_config().values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("rounds = 'many'", "rounds in .* must be a whole number"),
        ("colour = 3", "unknown option 'colour'"),
        ("rounds = 0", "rounds must be at least 1"),
        ("partition = 'zipf'", "partition must be one of iid, dirichlet"),
        ("target_epsilon = -1.0", "target_epsilon must be greater than 0"),
        ("target_epsilon = 3.0\nnoise_multiplier = 1.0", "either target_epsilon or noise_multiplier"),
        ("delta = 2.0", "delta must be in"),
        ("min_fit_clients = 0", "min_fit_clients must be at least 1"),
        ("clients = 3\nmin_fit_clients = 4", "min_fit_clients must be between 1 and clients \\(3\\), not 4"),
        ("clients = 3\nmin_available_clients = 0", "min_available_clients must be between 1 and clients"),
        ("this is not toml", "is not valid TOML"),
        ("[server]\nrounds = 3", "has a section \\[server\\]"),
    ],
)
def test_bad_config_files(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(FedtrainError, match=message):
        resolve(path, {})


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(FedtrainError, match="does not exist"):
        resolve(tmp_path / "none.toml", {})


def test_resolved_config_toml_reloads_identically(tmp_path) -> None:
    config = Config(labels=["x", "y"], input_shape=[3], num_classes=2, noise_multiplier=0.7, target_epsilon=None)
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert resolve(path, {}) == config
