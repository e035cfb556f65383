"""Built-in models (logistic, mlp, cnn) and user models given as `module:factory`.

Every model is made Opacus-compatible here, once, on the server and on every client alike, so
their state_dicts agree: BatchNorm becomes GroupNorm (the user is told), and a layer Opacus cannot
train privately is named in a clear error.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedtrain.errors import FedtrainError

log = logging.getLogger("fedtrain")
BUILTIN_MODELS = ("logistic", "mlp", "cnn")


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class MeanAndDeviations(nn.Module):
    """Each flattened sample as (its deviations from its own mean, that mean): D features -> D + 1.

    Why: DP-SGD's noise is isotropic in parameter space, and the noise a first-layer weight vector
    carries reaches the output in proportion to ||x||. Most of an image's norm is its common
    brightness (on digits E||x||^2 falls from 15 to 9), which this moves into one coordinate.
    The map is linear and invertible, so the model class is unchanged; it looks at one sample
    only, so it costs no privacy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return torch.cat([x - mean, mean], dim=1)


def logistic(input_shape: list[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (on MeanAndDeviations features: same model class)."""
    features = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), MeanAndDeviations(), nn.Linear(features + 1, num_classes))


def mlp(input_shape: list[int], num_classes: int, hidden: int = 32) -> nn.Module:
    """One tanh hidden layer: bounded activations suit DP-SGD's clipped gradients."""
    return nn.Sequential(
        nn.Flatten(),
        MeanAndDeviations(),
        nn.Linear(math.prod(input_shape) + 1, hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    )


def cnn(input_shape: list[int], num_classes: int) -> nn.Module:
    """A small tanh CNN for DP-SGD, sized by the input (8x8 to 32x32 and larger); the same for every client.

    After the tanh CNN of Papernot et al. (2021, "Tempered sigmoid activations for deep learning with
    differential privacy"): a strided 8x8 convolution, a strided 4x4 one, each followed by a 2x2 max-pool
    of stride 1, then a 32-unit tanh layer. Bounded activations keep per-example gradients of similar
    size, so clipping loses less; no normalisation layer (GroupNorm measured worse here: docs/privacy.md).
    Images smaller than 16 (or 8) pixels get 3x3 unstrided convolutions instead, and the feature map is
    average-pooled to at most 4x4, so 8x8, 28x28 and 32x32 inputs all keep their spatial layout.
    """
    if len(input_shape) != 3 or min(input_shape[1:]) < 2:
        raise FedtrainError(
            f"model 'cnn' needs images (channels, height >= 2, width >= 2), but the data has shape "
            f"{input_shape}; use model 'mlp' for tabular data."
        )
    channels, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    if size >= 16:
        layers.append(nn.Conv2d(channels, 16, 8, stride=2, padding=3))
        size //= 2
    else:
        layers.append(nn.Conv2d(channels, 16, 3, padding=1))
    layers.append(nn.Tanh())
    if size >= 2:
        layers.append(nn.MaxPool2d(2, stride=1))
        size -= 1
    if size >= 8:
        layers.append(nn.Conv2d(16, 32, 4, stride=2))
        size = (size - 4) // 2 + 1
    else:
        layers.append(nn.Conv2d(16, 32, 3, padding=1))
    layers.append(nn.Tanh())
    if size >= 2:
        layers.append(nn.MaxPool2d(2, stride=1))
        size -= 1
    pooled = min(4, size)
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(32 * pooled * pooled, 32), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, num_classes))


def _imported_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FedtrainError(
            f"cannot import model module {module_name!r} ({type(exc).__name__}: {exc}); "
            "check it is installed or on PYTHONPATH."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FedtrainError(f"module {module_name!r} has no callable {attr!r}; give MODULE:FUNCTION.")
    return factory


def _user_model(factory: Callable[..., Any], spec: str, input_shape: list[int], num_classes: int) -> nn.Module:
    """Call a user's factory with what it asks for of input_shape and num_classes (outputs per sample)."""
    offered = {"input_shape": list(input_shape), "num_classes": num_classes, "num_outputs": num_classes}
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise FedtrainError(f"model factory {spec} failed: {type(exc).__name__}: {exc}.") from None
    if not isinstance(model, nn.Module):
        raise FedtrainError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def make_private_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fix what Opacus can fix (ModuleValidator.fix) and report each replaced layer.

    Raises FedtrainError naming the first layer that still cannot be trained with DP-SGD.
    """
    from opacus.validators import ModuleValidator

    before = {name: type(m).__name__ for name, m in model.named_modules()}
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    after = {name: type(m).__name__ for name, m in model.named_modules()}
    replaced = [
        f"{name}: {before[name]} -> {after[name]}" for name in after if name in before and before[name] != after[name]
    ]
    from opacus.grad_sample import GradSampleModule

    # ModuleValidator knows the layers it can swap; GradSampleModule also refuses trainable layers
    # that carry buffers (their statistics would leak data without noise).
    remaining = ModuleValidator.validate(model, strict=False) or GradSampleModule.validate(model, strict=False)
    if remaining:
        detail = " ".join(str(remaining[0]).split())
        raise FedtrainError(f"the model cannot be trained with DP-SGD: {detail} Replace that layer.")
    return model, replaced


ModelSpec = str | Callable[..., nn.Module]  # a built-in name, MODULE:FACTORY, or a factory (the Python API)


def model_name(spec: ModelSpec) -> str:
    """How a model is named in configs and messages (a Python factory by its qualified name)."""
    if isinstance(spec, str):
        return spec
    return f"python:{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__name__)}"


def build_model(
    spec: ModelSpec, input_shape: list[int], num_classes: int, *, hidden: int = 32, seed: int | None = None
) -> nn.Module:
    """Build, make DP-compatible and sanity-check a model for this data.

    Args:
        spec: "logistic", "mlp", "cnn", "MODULE:FACTORY", or a factory taking any of input_shape,
            num_classes (= num_outputs, the outputs per sample) as keywords.
        input_shape: one sample's shape.
        num_classes: outputs per sample (classes, labels, or regression targets).
        hidden: the MLP's width.
        seed: seeds torch before the model is made (server and clients build identical weights).

    Returns:
        The model, Opacus-compatible (BatchNorm replaced by GroupNorm, with a warning).

    Raises:
        FedtrainError: an unknown name, a factory that fails or returns no Module, a layer DP-SGD
            cannot train, or outputs of the wrong shape.
    """
    if seed is not None:
        torch.manual_seed(seed)
    name = model_name(spec)
    if callable(spec):
        model = _user_model(spec, name, input_shape, num_classes)
    elif name == "logistic":
        model = logistic(input_shape, num_classes)
    elif name == "mlp":
        model = mlp(input_shape, num_classes, hidden)
    elif name == "cnn":
        model = cnn(input_shape, num_classes)
    elif ":" in name:
        model = _user_model(_imported_factory(name), name, input_shape, num_classes)
    else:
        raise FedtrainError(
            f"unknown model {name!r}; use one of {', '.join(BUILTIN_MODELS)} or MODULE:FACTORY for your own."
        )
    model, replaced = make_private_compatible(model)
    for change in replaced:
        log.warning("model made DP-compatible: %s", change)
    _check_output(model, name, input_shape, num_classes)
    return model


def _check_output(model: nn.Module, name: str, input_shape: list[int], num_classes: int) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise FedtrainError(
            f"model {name!r} does not accept inputs of shape {input_shape} ({type(exc).__name__}: {exc})."
        ) from None
    finally:
        model.train()
    if tuple(out.shape) != (2, num_classes):
        raise FedtrainError(
            f"model {name!r} outputs shape {list(out.shape[1:])} per sample, but the task needs {num_classes} "
            "(one score per class or label, or one value per regression target); fix its last layer."
        )
