"""Ghost clipping (Opacus's fast gradient clipping) trains exactly as Opacus's reference mode, hooks, and
fedtrain takes it by itself when per-sample gradients would not fit; mixed precision clips in float32.

The reference is hooks, which stores every per-sample gradient and clips each; ghost clipping never
stores one (per-sample norms from activations and output gradients, then a second backward pass on
the clipped loss). Same model init, batch and noise seed through both: a difference in norms,
clipping, noise or accounting shows up as different parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedtrain.clients.grad_sample_mode import (
    GHOST,
    REFERENCE_MODE,
    choose_grad_sample_mode,
    matches_reference,
    per_sample_gradient_bytes,
)
from fedtrain.clients.trainer import TaskLoss, TrainSettings, planned_round, private_step, train_round
from fedtrain.data import ArrayDataset
from fedtrain.errors import FedtrainError
from fedtrain.models import BUILTIN_MODELS, build_model
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.tasks import Classification

SHAPE = [1, 8, 8]
CLASSES = 10
BATCH = 12
CPU = torch.device("cpu")
CLIP = 0.05  # most samples are clipped, so clipping is part of what is compared


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, *SHAPE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _step(name: str, mode: str, noise_multiplier: float, batch=None, precision: str = "fp32"):
    """(trainable parameters after one trainer step, the accountant's history), made private as
    fedtrain's trainer does it: the task's loss as criterion, ghost clipping's wrapper of it when ghost."""
    model = build_model(name, SHAPE, CLASSES, seed=0)
    x, y = _batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH // 3)  # Poisson rate 1/3
    loss = TaskLoss(Classification())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=CLIP,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(7),
            grad_sample_mode=mode,
            criterion=loss,
        )
        private_model, optimizer = made[0], made[1]
        criterion = made[2] if mode == GHOST else loss
        private_step(private_model, optimizer, criterion, *(batch if batch is not None else (x, y)), precision)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad], engine.accountant.history, model


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_ghost_clipping_takes_the_same_noised_step_as_hooks(name: str) -> None:
    assert matches_reference(build_model(name, SHAPE, CLASSES, seed=0), GHOST, SHAPE, CPU)
    ghost, ghost_history, _ = _step(name, GHOST, noise_multiplier=1.0)
    hooks, hooks_history, reference = _step(name, REFERENCE_MODE, noise_multiplier=1.0)
    noiseless, _, _ = _step(name, GHOST, noise_multiplier=0.0)
    norms = torch.stack([p.grad_sample.reshape(BATCH, -1).norm(dim=1) for p in reference.parameters()]).norm(dim=0)
    assert (norms > CLIP).sum() >= BATCH // 2, "clipping must act on the batch for this test to check it"
    assert any(not torch.allclose(g, n) for g, n in zip(ghost, noiseless, strict=True)), "noise was not added"
    for g, h in zip(ghost, hooks, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    assert ghost_history == hooks_history == [(1.0, 1 / 3, 1)]


def test_an_empty_poisson_batch_with_ghost_clipping_is_pure_noise_as_with_hooks() -> None:
    empty = (torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long))
    before = [p.detach() for p in build_model("cnn", SHAPE, CLASSES, seed=0).parameters()]
    ghost, ghost_history, _ = _step("cnn", GHOST, noise_multiplier=1.0, batch=empty)
    hooks, hooks_history, _ = _step("cnn", REFERENCE_MODE, noise_multiplier=1.0, batch=empty)
    for g, h, b in zip(ghost, hooks, before, strict=True):
        assert not torch.allclose(g, b), "the empty step must still add noise"
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    assert ghost_history == hooks_history == [(1.0, 1 / 3, 1)]


def test_above_the_memory_cap_ghost_clipping_is_chosen_and_trains_the_planned_round(monkeypatch) -> None:
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    # Counted here from the layer sizes, not from fedtrain: 64 pixels and their mean -> 32 -> 10 with biases,
    # float32, batch 16.
    need = 16 * ((65 * 32 + 32) + (32 * 10 + 10)) * 4
    assert per_sample_gradient_bytes(model, 16) == need
    assert choose_grad_sample_mode(model, SHAPE, CPU, batch=16, memory_cap_bytes=need) == "ew"
    assert choose_grad_sample_mode(model, SHAPE, CPU, batch=16, memory_cap_bytes=need - 1) == GHOST

    # The trainer asks Opacus for it, with its physical batch and a cap in MiB, and the round counts as planned.
    modes: list[str] = []
    real = PrivacyEngine.make_private
    monkeypatch.setattr(
        PrivacyEngine, "make_private", lambda self, **kw: (modes.append(kw["grad_sample_mode"]), real(self, **kw))[1]
    )
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((64, *SHAPE), dtype=np.float32), np.arange(64) % CLASSES, list("abcdefghij"))
    settings = TrainSettings(16, 1, 0.5, 0.0, 1.0, grad_sample_memory_mib=(need - 1) / 2**20)
    result = train_round(model, data, settings, 1.0, PrivacyLedger(delta=1e-5), CPU)
    assert modes[-1] == GHOST  # (the probe, before it, made a copy private with ghost clipping too)
    assert result.entry == planned_round(64, settings, 1.0) and np.isfinite(result.loss)


def test_ghost_clipping_that_clips_wrongly_is_refused(monkeypatch) -> None:
    """Clipping factors all 1 (nothing clipped): the probe must see it, a request fails, and auto stores
    per-sample gradients anyway, in the CPU's fastest mode that matches hooks."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    monkeypatch.setattr(
        GradSampleModuleFastGradientClipping, "get_clipping_coef", lambda self: torch.ones(len(self.get_norm_sample()))
    )
    assert not matches_reference(model, GHOST, SHAPE, CPU)
    with pytest.raises(FedtrainError, match="grad_sample_mode = ghost does not give this model"):
        choose_grad_sample_mode(model, SHAPE, CPU, requested=GHOST)
    assert choose_grad_sample_mode(model, SHAPE, CPU, batch=16, memory_cap_bytes=1) == "ew"


def test_bf16_is_refused_where_only_ghost_clipping_would_fit() -> None:
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    with pytest.raises(FedtrainError, match="ghost clipping would fit, but fedtrain does not combine it"):
        choose_grad_sample_mode(model, SHAPE, CPU, batch=16, memory_cap_bytes=1, precision="bf16")
    with pytest.raises(FedtrainError, match="cannot be used with precision = bf16"):
        choose_grad_sample_mode(model, SHAPE, CPU, requested=GHOST, precision="bf16")


def test_a_bf16_step_clips_each_sample_in_float32_and_stays_near_the_fp32_step() -> None:
    # Expanded weights cannot run under autocast: the probe finds it, hooks is taken.
    assert choose_grad_sample_mode(build_model("cnn", SHAPE, CLASSES, seed=0), SHAPE, CPU, precision="bf16") == "hooks"
    bf16, history, model = _step("cnn", REFERENCE_MODE, noise_multiplier=0.0, precision="bf16")
    fp32, _, _ = _step("cnn", REFERENCE_MODE, noise_multiplier=0.0)
    for p in model.parameters():
        assert p.grad_sample.dtype == torch.float32 and p.summed_grad.dtype == torch.float32
    # Each sample's clipped contribution, recomputed here from its per-sample gradients, is within the bound.
    norms = torch.stack([p.grad_sample.reshape(BATCH, -1).norm(dim=1) for p in model.parameters()]).norm(dim=0)
    assert (norms * (CLIP / (norms + 1e-6)).clamp(max=1.0) <= CLIP * (1 + 1e-6)).all() and (norms > CLIP).any()
    moved = sum(float((b - f).norm()) for b, f in zip(bf16, fp32, strict=True))
    start = [p.detach() for p in build_model("cnn", SHAPE, CLASSES, seed=0).parameters()]
    step = sum(float((f - p0).norm()) for f, p0 in zip(fp32, start, strict=True))
    assert moved < 0.05 * step, "bfloat16's forward changes the step by more than its rounding"
    assert history == [(0.0, 1 / 3, 1)]


@pytest.mark.parametrize("name", ["transformer", "resnet18gn"])
def test_ghost_clipping_gives_hooks_clipped_sum_on_the_gpu_checks_model_shapes(name: str) -> None:
    """Attention, LayerNorm, GroupNorm and residual convolutions (benchmarks/large_models.py, made narrow
    so the probe is quick): the probe compares ghost clipping's clipped sum with hooks' per-sample
    gradients clipped here, at a bound that clips about half the samples."""
    large_models = _benchmark_module("large_models")
    small_transformer, BasicBlock = large_models.small_transformer, large_models.BasicBlock

    def narrow(num_classes: int) -> torch.nn.Module:
        if name == "transformer":
            return small_transformer(num_classes, width=32, depth=2, heads=2)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, 1, 1), BasicBlock(32, 64, 2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(64, num_classes),
        )  # fmt: skip

    shape = large_models.MODELS[name][1]
    model = build_model(narrow, shape, CLASSES, seed=0)
    assert matches_reference(model, GHOST, shape, CPU)


def _benchmark_module(name: str):
    """A module of this repo's benchmarks/ (by path: Opacus's wheel installs a top-level `benchmarks`)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
