"""Built-in and user models; Opacus compatibility fixed with a report, or a clear error."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import torch
from torch import nn

from fedtrain.errors import FedtrainError
from fedtrain.models import build_model, make_private_compatible


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32]])
def test_cnn_fits_common_image_sizes(shape: list[int]) -> None:
    model = build_model("cnn", shape, 10)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("shape", [[1, 8, 8], [1, 28, 28], [3, 32, 32], [3, 64, 64]])
def test_cnn_keeps_the_images_layout_with_bounded_activations_and_no_cross_sample_layer(shape: list[int]) -> None:
    """Issue 14: the former cnn averaged a 28x28 image down to 2x2 before its classifier. The rebuilt one
    keeps a 4x4 map of features however large the input, uses tanh only, and has no normalisation layer."""
    model = build_model("cnn", shape, 10)
    seen: list[tuple[int, ...]] = []
    pool = next(m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d))
    pool.register_forward_hook(lambda module, args, out: seen.extend([tuple(args[0].shape), tuple(out.shape)]))
    model(torch.zeros(2, *shape))
    before, after = seen
    assert min(before[2:]) >= 4 and after[2:] == (4, 4)
    kinds = {type(m) for m in model.modules()}
    assert nn.Tanh in kinds and not kinds & {nn.ReLU, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d}


def test_cnn_on_tabular_data_says_what_to_use() -> None:
    with pytest.raises(FedtrainError, match="use model 'mlp'"):
        build_model("cnn", [64], 10)


def test_batchnorm_is_replaced_and_reported(caplog) -> None:
    fixed, replaced = make_private_compatible(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    assert replaced == ["1: BatchNorm2d -> GroupNorm"]
    assert isinstance(fixed[1], nn.GroupNorm)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            import torch.nn as nn

            def good(input_shape, num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8),
                                     nn.Linear(8, num_classes))

            def wrong_output():
                return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

            def not_a_module(**kwargs):
                return 42

            class RunningScale(nn.Module):
                # trainable and keeps data statistics in a buffer: not private, not fixable
                def __init__(self):
                    super().__init__()
                    self.scale = nn.Parameter(torch.ones(4))
                    self.register_buffer("running_max", torch.zeros(4))
                def forward(self, x):
                    self.running_max = torch.maximum(self.running_max, x.detach().abs().amax(0))
                    return x * self.scale

            def unfixable():
                return nn.Sequential(RunningScale(), nn.Linear(4, 2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_models", None)


def test_user_factory_is_built_and_fixed(user_models, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtrain"):
        model = build_model("my_models:good", [4], 2)
    assert model(torch.zeros(2, 4)).shape == (2, 2)
    assert "BatchNorm1d -> GroupNorm" in caplog.text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("my_models:wrong_output", "outputs shape \\[3\\] per sample, but the task needs 2"),
        ("my_models:not_a_module", "returned int, not a torch.nn.Module"),
        ("my_models:missing", "has no callable 'missing'"),
        ("no_such_module_xyz:f", "cannot import model module"),
        ("transformer", "unknown model"),
        ("my_models:unfixable", "cannot be trained with DP-SGD: .*0:RunningScale"),
    ],
)
def test_bad_models_are_clear_errors(user_models, spec: str, message: str) -> None:
    with pytest.raises(FedtrainError, match=message):
        build_model(spec, [4], 2)


def test_same_seed_same_initial_model() -> None:
    a = build_model("mlp", [1, 8, 8], 10, seed=3).state_dict()
    b = build_model("mlp", [1, 8, 8], 10, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dense_models_see_each_sample_as_its_mean_and_deviations() -> None:
    """The re-parametrisation keeps the model class (any linear model on x is one on the new
    features) and shrinks the input norm DP noise is multiplied by (digits: 15 -> 9 in E||x||^2)."""
    from sklearn.datasets import load_digits

    from fedtrain.models import MeanAndDeviations

    x = torch.from_numpy(load_digits().data / 16.0).float()
    features = MeanAndDeviations()(x)
    assert features.shape == (len(x), 65)
    assert torch.allclose(features[:, :64] + features[:, 64:], x, atol=1e-6)  # invertible
    ratio = float((features**2).sum(1).mean() / (x**2).sum(1).mean())
    assert 0.55 < ratio < 0.65

    plain = nn.Linear(64, 10)
    model = build_model("logistic", [1, 8, 8], 10)
    linear = model[-1]
    with torch.no_grad():  # w.x + b == [w, sum(w)] . [x - m, m] + b
        linear.weight.copy_(torch.cat([plain.weight, plain.weight.sum(1, keepdim=True)], 1))
        linear.bias.copy_(plain.bias)
    assert torch.allclose(model(x.view(-1, 1, 8, 8)), plain(x), atol=1e-4)
