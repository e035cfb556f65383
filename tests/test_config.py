"""One config: defaults < TOML < command line; every bad value is one sentence."""

from __future__ import annotations

import pytest

from fedtrain.config import Config, resolve
from fedtrain.errors import FedtrainError


def test_cli_overrides_file_which_overrides_defaults(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nclients = 3\nmodel = "cnn"\n')
    config = resolve(path, {"rounds": 2, "clients": None})
    assert (config.federation.rounds, config.federation.clients, config.training.model) == (2, 3, "cnn")
    assert config.training.batch_size == Config().training.batch_size


def test_dashed_keys_and_a_fedtrain_table_are_accepted(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[fedtrain]\nbatch-size = 16\n")
    assert resolve(path, {}).training.batch_size == 16


def test_choosing_noise_multiplier_switches_off_the_target(tmp_path) -> None:
    assert resolve(None, {"noise_multiplier": 1.1}).privacy.target_epsilon is None
    path = tmp_path / "run.toml"
    path.write_text("noise_multiplier = 0.8\n")
    assert resolve(path, {}).privacy.target_epsilon is None
    assert resolve(path, {"target_epsilon": 2.0}).privacy.noise_multiplier is None


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
        ("grad_sample_mode = 'fastest'", "grad_sample_mode must be one of auto, hooks, ew, functorch, ghost"),
        ("precision = 'fp16'", "precision must be one of fp32, bf16"),
        ("grad_sample_memory_mib = 0", "grad_sample_memory_mib must be greater than 0"),
        ("grad_sample_mode = 'ghost'\nprecision = 'bf16'", "ghost cannot be used with precision = bf16"),
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


def test_sections_in_a_file_and_flat_keys_are_the_same_config(tmp_path) -> None:
    sectioned = tmp_path / "sections.toml"
    sectioned.write_text(
        '[data]\nsource = "digits"\neval_fraction = 0.1\n[strategy]\nname = "fedadam"\n'
        '[privacy]\ntarget_epsilon = 2.0\nmetrics = "none"\n[training]\nlr = 0.3\n'
    )
    flat = tmp_path / "flat.toml"
    flat.write_text('data = "digits"\neval_fraction = 0.1\nstrategy = "fedadam"\ntarget_epsilon = 2.0\n'
                    'metrics = "none"\nlr = 0.3\n')  # fmt: skip
    config = resolve(sectioned, {})
    assert config == resolve(flat, {})
    assert (config.strategy.name, config.privacy.metrics, config.training.lr) == ("fedadam", "none", 0.3)
    written = tmp_path / "written.toml"
    written.write_text(config.to_toml())  # the resolved config is written in sections, and reads back
    assert "[privacy]" in written.read_text() and resolve(written, {}) == config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[privacy]\nrounds = 3", "has no option 'rounds' in \\[privacy\\]"),
        ("[privacy]\nmetrics = 'loud'", "metrics must be one of none, private, plain"),
        ("[training]\nbatch_size = 2.5", "batch_size in .* must be a whole number"),
        ("[data]\nlabels = 'a'", "labels in .* must be a list"),
    ],
)
def test_bad_sections(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(FedtrainError, match=message):
        resolve(path, {})


def test_options_are_typed_from_their_hints() -> None:
    from typing import get_args, get_type_hints

    from fedtrain.config import METRICS_MODES, PrivacyConfig

    assert get_args(get_type_hints(PrivacyConfig)["metrics"]) == METRICS_MODES
    with pytest.raises(FedtrainError, match="accountant must be one of prv, rdp, not 'moments'"):
        Config(accountant="moments").validate()
