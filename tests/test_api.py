"""The Python API (issue 16): `fedtrain.simulate` with a torch Dataset, a path or arrays, a model
factory and any task, returning a model that predicts; `fedtrain.load_model`; bad input is the same
one-sentence FedtrainError the CLI gives, before anything is created; the process is left as found."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedtrain
from fedtrain.errors import FedtrainError


class Cubes(torch.utils.data.Dataset):
    """A user's own torch Dataset: y = a fixed linear function of x (a regression with known answer)."""

    def __init__(self, n: int = 240, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = torch.from_numpy(rng.uniform(-1, 1, (n, 4)).astype(np.float32))
        self.y = (self.x @ torch.tensor([0.3, -0.2, 0.1, 0.25]) + 0.5).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def linear(input_shape, num_outputs):
    return nn.Linear(input_shape[0], num_outputs)


@pytest.mark.own_process  # starts Ray in-process (tests/conftest.py)
@pytest.mark.timeout(600)
def test_simulate_a_torch_dataset_with_a_factory_and_regression(tmp_path: Path) -> None:
    data = Cubes()
    environment = dict(os.environ)
    flwr_level = logging.getLogger("flwr").level
    result = fedtrain.simulate(data=data, model=linear, task="regression", clients=3, rounds=5, target_epsilon=8,
                               target_range=[0.0, 1.0], lr=0.5, batch_size=16, run_dir=tmp_path / "run")  # fmt: skip
    assert [row["round"] for row in result.history] == [1, 2, 3, 4, 5]
    assert result.history[-1]["metric"] == "r2" and result.history[-1]["accuracy"] > 0.2
    assert isinstance(result.model, nn.Module)
    predicted = result.model(data.x[:64]).detach().ravel()
    assert float(((predicted - data.y[:64]) ** 2).mean()) < float(data.y[:64].var())  # it predicts
    assert all(client["epsilon"] <= 8 + 1e-9 for client in result.privacy["clients"].values())
    assert result.run_dir == tmp_path / "run" and (result.run_dir / "model.ftenc").exists()
    # the encrypted model opens again with the same factory
    again = fedtrain.load_model(result.run_dir, result.key_file, model=linear)
    pairs = zip(again.state_dict().values(), result.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # the caller's process as it was: environment, loggers, no Ray left running
    assert dict(os.environ) == environment and logging.getLogger("flwr").level == flwr_level
    import ray

    assert not ray.is_initialized()


@pytest.mark.own_process  # starts Ray in-process (tests/conftest.py)
@pytest.mark.timeout(600)
def test_simulate_a_path_and_arrays(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, x=(digits.images * 16).astype(np.uint8), y=digits.target)
    by_path = fedtrain.simulate(data=path, clients=2, rounds=2)
    by_arrays = fedtrain.simulate(data=(digits.images / 16.0, digits.target), model="mlp", clients=2, rounds=2)
    for result in (by_path, by_arrays):
        assert len(result.history) == 2 and result.history[-1]["accuracy"] > 0.4
        assert result.run_dir.name.startswith("fedtrain-run-") and result.key_file is not None
        assert result.key_file.parent != result.run_dir  # the key is never beside the model
        logits = result.model(torch.from_numpy((digits.images[:5] / 16.0).astype(np.float32))[:, None])
        assert logits.shape == (5, 10)


def wrong_type(input_shape, num_outputs):
    return "a model"


def three_outputs(input_shape, num_outputs):
    return nn.Linear(input_shape[0], 3)


class Detached(fedtrain.Task):
    name = "detached"
    target_kind = "values"
    values = ("loss",)

    def output_size(self, num_classes, num_outputs):
        return 1

    def loss(self, outputs, targets):
        return (outputs.detach().ravel() - targets) ** 2  # no gradient reaches the model

    def example_values(self, outputs, targets):
        return self.loss(outputs, targets)[:, None]

    def bounds(self, outputs):
        return [1.0]


class PerBatch(Detached):
    def loss(self, outputs, targets):
        return ((outputs.ravel() - targets) ** 2).mean()  # one value, not one per example


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"data": 42}, "data must be a path, a built-in name, a torch Dataset or arrays (x, y), not int"),
        ({"data": (np.zeros((5, 4)), np.zeros(4))}, "as many targets as samples"),
        ({"data": Cubes(), "model": wrong_type, "task": "regression"}, "returned str, not a torch.nn.Module"),
        ({"data": Cubes(), "model": three_outputs, "task": "regression"}, "outputs shape [3] per sample, but the task"),
        ({"data": Cubes(), "model": linear, "task": Detached()}, "does not depend on the model"),
        ({"data": Cubes(), "model": linear, "task": PerBatch()}, "must give one value per example"),
        ({"data": Cubes(), "model": 3}, "model must be a name or a factory"),
        ({"task": "translation"}, "unknown task 'translation'"),
        ({"rounds": 0}, "rounds must be at least 1"),
    ],
)  # fmt: skip
def test_bad_input_through_the_api_is_one_sentence_and_creates_nothing(tmp_path: Path, arguments, message) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(FedtrainError) as raised:
        fedtrain.simulate(**{"clients": 2, "rounds": 1, "run_dir": run_dir, **arguments})
    assert message in str(raised.value)
    assert not run_dir.exists()


def test_load_model_needs_the_factory_of_a_python_model(tmp_path: Path) -> None:
    from fedtrain.config import Config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text('{"run_id": "x", "key_id": "y"}')
    (run_dir / "config.toml").write_text(Config(model="python:m.f", input_shape=[4], num_classes=2).to_toml())
    with pytest.raises(FedtrainError, match="holds no final model"):
        fedtrain.load_model(run_dir, _key(tmp_path))


def _key(folder: Path) -> Path:
    from fedtrain.security.keys import generate_key, write_key_file

    return write_key_file(folder / "model.key", generate_key())
