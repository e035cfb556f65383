"""What a task defines: the per-sample loss, the metrics, and optional per-sample transforms.

Built in: `classification` (cross-entropy; accuracy), `regression` (MSE; MAE and R^2) and
`multilabel` (binary cross-entropy per label; micro F1). A user task is a `Task` subclass named as
`module:Name` (in TOML or on the CLI, and a client runs it only if its policy lists it), or a Task
object given to `fedtrain.simulate`.

Metrics leave a client only through the Gaussian mechanism (privacy/releases.py), which needs each
example's contribution bounded: so a task gives, per example, a vector of values each clipped to
[0, its bound], and turns the released *means* of those values into its metrics (`report`), which
is post-processing. The server aggregates the clients' means weighted by their counts before
`report`, so a metric like R^2 is computed over all clients' data, never averaged.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedtrain.errors import FedtrainError

BUILTIN_TASKS = ("classification", "regression", "multilabel")
Transform = Callable[[np.ndarray], np.ndarray]


class Task:
    """A task. Subclasses set `name`, `target_kind`, `values` and implement the methods below."""

    name: ClassVar[str] = "task"
    target_kind: ClassVar[str] = "classes"  # "classes" (int64 class ids) or "values" (float32 targets)
    values: ClassVar[tuple[str, ...]] = ("loss",)  # per-example values a metric release sums
    headline: ClassVar[str] = "loss"  # the metric the round table shows
    higher_is_better: ClassVar[bool] = False
    train_transform: Transform | None = None  # e.g. augmentation: reads one sample, costs no privacy
    eval_transform: Transform | None = None

    def output_size(self, num_classes: int | None, num_outputs: int | None) -> int:
        """How many outputs per sample the model must have."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example training loss, shape (batch,)."""
        raise NotImplementedError

    def example_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example values, shape (batch, len(values)), each meant to lie in [0, its bound]."""
        raise NotImplementedError

    def bounds(self, outputs: int) -> list[float]:
        """The largest value each of `values` counts (larger ones are clipped before a release)."""
        raise NotImplementedError

    def report(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics from the (released) means of `values`; must include "loss" and `headline`."""
        return {"loss": means["loss"]}

    def check(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One sentence when the model's outputs or the loss do not fit this task."""
        try:
            loss = self.loss(outputs, targets)
        except Exception as exc:
            raise FedtrainError(
                f"task {self.name!r} cannot compute its loss on the model's outputs of shape {list(outputs.shape)} "
                f"and targets of shape {list(targets.shape)} ({type(exc).__name__}: {exc})."
            ) from None
        if loss.shape != (outputs.shape[0],):
            raise FedtrainError(
                f"task {self.name!r}'s loss has shape {list(loss.shape)}; it must give one value per example "
                f"({outputs.shape[0]})."
            )
        if not loss.requires_grad:
            raise FedtrainError(f"task {self.name!r}'s loss does not depend on the model; make it differentiable.")


class Classification(Task):
    name = "classification"
    target_kind = "classes"
    values = ("loss", "accuracy")
    headline = "accuracy"
    higher_is_better = True

    def output_size(self, num_classes: int | None, num_outputs: int | None) -> int:
        if not num_classes:
            raise FedtrainError("classification needs the number of classes (num_classes or labels).")
        return num_classes

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets.long(), reduction="none")

    def example_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        correct = (outputs.argmax(dim=1) == targets).to(outputs.dtype)
        return torch.stack([self.loss(outputs, targets), correct], dim=1)

    def bounds(self, outputs: int) -> list[float]:
        # cross-entropy counts up to twice a uniform guess's (ln K each); correctness is 0 or 1
        return [2.0 * math.log(max(2, outputs)), 1.0]

    def report(self, means: dict[str, float]) -> dict[str, float]:
        return {"loss": means["loss"], "accuracy": means["accuracy"]}


class Regression(Task):
    """MSE. Its metrics need the targets' public range [low, high] (`target_range`): reading the
    range off the data would cost privacy. R^2 = 1 - MSE / Var(y), from released means of the
    squared error, y and y^2 (the targets shifted to [0, high - low])."""

    name = "regression"
    target_kind = "values"
    values = ("loss", "abs_error", "target", "target_sq")
    headline = "r2"
    higher_is_better = True

    def __init__(self, target_range: tuple[float, float] | None = None) -> None:
        self.target_range = target_range

    def output_size(self, num_classes: int | None, num_outputs: int | None) -> int:
        return num_outputs or 1

    def _pair(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.reshape(outputs.shape[0], -1), targets.reshape(targets.shape[0], -1).to(outputs.dtype)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out, y = self._pair(outputs, targets)
        return ((out - y) ** 2).mean(dim=1)

    def _range(self) -> tuple[float, float]:
        if self.target_range is None:
            raise FedtrainError(
                "regression metrics are released privately only with the targets' public range: set "
                'target_range = [low, high] (or metrics = "none").'
            )
        return self.target_range

    def example_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # without a range the values are exact (the server's own test set); only a release needs bounds
        low = self.target_range[0] if self.target_range is not None else 0.0
        out, y = self._pair(outputs, targets)
        shifted = (y - low).mean(dim=1)
        return torch.stack([self.loss(outputs, targets), (out - y).abs().mean(dim=1), shifted, shifted**2], dim=1)

    def bounds(self, outputs: int) -> list[float]:
        low, high = self._range()
        width = high - low
        return [width**2, width, width, width**2]

    def report(self, means: dict[str, float]) -> dict[str, float]:
        variance = means["target_sq"] - means["target"] ** 2
        r2 = 1.0 - means["loss"] / variance if variance > 0 else float("nan")
        return {"loss": means["loss"], "mae": means["abs_error"], "r2": r2}


class Multilabel(Task):
    """Binary cross-entropy on each of L labels (targets 0/1); micro F1 from each example's true
    positives, false positives and false negatives (as shares of L, so each lies in [0, 1])."""

    name = "multilabel"
    target_kind = "values"
    values = ("loss", "tp", "fp", "fn")
    headline = "f1"
    higher_is_better = True

    def output_size(self, num_classes: int | None, num_outputs: int | None) -> int:
        if not (num_classes or num_outputs):
            raise FedtrainError("multilabel needs the number of labels (num_classes or labels).")
        return int(num_classes or num_outputs)  # type: ignore[arg-type]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs.dtype), reduction="none"
        ).mean(dim=1)

    def example_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted = (outputs > 0).to(outputs.dtype)
        y = targets.to(outputs.dtype)
        labels = outputs.shape[1]
        tp, fp, fn = (predicted * y).sum(1), (predicted * (1 - y)).sum(1), ((1 - predicted) * y).sum(1)
        return torch.stack([self.loss(outputs, targets), tp / labels, fp / labels, fn / labels], dim=1)

    def bounds(self, outputs: int) -> list[float]:
        return [5.0, 1.0, 1.0, 1.0]  # the mean cross-entropy over labels, clipped: a uniform guess is ln 2

    def report(self, means: dict[str, float]) -> dict[str, float]:
        denominator = 2 * means["tp"] + means["fp"] + means["fn"]
        return {"loss": means["loss"], "f1": 2 * means["tp"] / denominator if denominator > 0 else float("nan")}


def build_task(spec: str | Task, target_range: list[float] | None = None) -> Task:
    """The task named `spec` (a built-in, or MODULE:NAME of a Task subclass or factory), or `spec` itself.

    Raises:
        FedtrainError: an unknown name, a module that does not import, or something that is not a Task.
    """
    if isinstance(spec, Task):
        return spec
    if spec == "classification":
        return Classification()
    if spec == "regression":
        return Regression(tuple(target_range) if target_range else None)  # type: ignore[arg-type]
    if spec == "multilabel":
        return Multilabel()
    if ":" not in spec:
        raise FedtrainError(
            f"unknown task {spec!r}; use one of {', '.join(BUILTIN_TASKS)} or MODULE:NAME for your own."
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FedtrainError(
            f"cannot import task module {module_name!r} ({type(exc).__name__}: {exc}); check it is installed."
        ) from None
    made: Any = getattr(module, attr, None)
    task = made() if isinstance(made, type) or callable(made) else made
    if not isinstance(task, Task):
        raise FedtrainError(f"{spec} is not a fedtrain Task (subclass fedtrain.Task, or return one).")
    return task
