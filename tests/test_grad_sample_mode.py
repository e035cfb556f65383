"""The Opacus grad-sample mode fedtrain picks trains exactly as Opacus's reference mode, hooks.

Every comparison runs the same model init, batch and noise seed through two modes that compute
per-sample gradients differently (PyTorch's expanded weights vs Opacus's hooks), so a difference in
per-sample gradients, clipping, noise or accounting shows up as different numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtrain.clients.grad_sample_mode import REFERENCE_MODE, choose_grad_sample_mode, matches_reference
from fedtrain.clients.trainer import private_step
from fedtrain.models import BUILTIN_MODELS, build_model

SHAPE = [1, 8, 8]  # an image: every built-in model takes it
CLASSES = 10
BATCH = 12
CPU = torch.device("cpu")
CLIP = 0.05  # small enough that most samples are clipped, so clipping is part of what is compared


@pytest.fixture(autouse=True)
def _fresh_probe_verdicts() -> None:
    """Some tests here change Opacus's code midway; a process whose libraries do not change keeps its verdicts."""
    from fedtrain.clients import grad_sample_mode

    grad_sample_mode._VERDICTS.clear()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, *SHAPE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _private(model: nn.Module, mode: str, noise_multiplier: float, seed: int = 7):
    """`model` made private as fedtrain's trainer does it, with a seeded noise generator."""
    x, y = _batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH // 3)  # Poisson rate 1/3: expected batch 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private_model, optimizer, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=CLIP,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed),
            grad_sample_mode=mode,
        )
    return engine, private_model, optimizer


def _step(name: str, mode: str, noise_multiplier: float, batch: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(model after one trainer step on the batch, its trainable parameters, the accountant's history)."""
    model = build_model(name, SHAPE, CLASSES, seed=0)
    engine, private_model, optimizer = _private(model, mode, noise_multiplier)
    x, y = batch if batch is not None else _batch()
    private_step(private_model, optimizer, nn.CrossEntropyLoss(), x, y)
    return model, [p for p in model.parameters() if p.requires_grad], engine.accountant.history


def _fast_mode(name: str) -> str:
    mode = choose_grad_sample_mode(build_model(name, SHAPE, CLASSES, seed=0), SHAPE, CPU)
    assert mode != REFERENCE_MODE, "the comparisons below would compare hooks with itself"
    return mode


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_on_the_cpu_the_builtin_models_use_expanded_weights(name: str) -> None:
    model = build_model(name, SHAPE, CLASSES, seed=0)
    rng = torch.get_rng_state()
    assert choose_grad_sample_mode(model, SHAPE, CPU) == "ew"
    # The probe left the trainer's random stream alone (it seeds the Poisson sampler before choosing)...
    assert torch.equal(torch.get_rng_state(), rng)
    # ...and ran on copies: the model itself carries no per-sample gradients, gradients or hooks.
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_on_cuda_hooks_are_chosen(name: str) -> None:
    # Hooks is the reference mode: it is taken without a probe, so no GPU is needed to check the choice.
    assert choose_grad_sample_mode(build_model(name, SHAPE, CLASSES, seed=0), SHAPE, torch.device("cuda")) == "hooks"


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_per_sample_gradients_and_their_clipped_sum_match_hooks(name: str) -> None:
    _, fast, _ = _step(name, _fast_mode(name), noise_multiplier=0.0)
    _, reference, _ = _step(name, REFERENCE_MODE, noise_multiplier=0.0)
    norms = torch.stack([p.grad_sample.reshape(BATCH, -1).norm(dim=1) for p in reference]).norm(dim=0)
    assert (norms > CLIP).sum() >= BATCH // 2, "clipping must act on the batch for this test to check it"
    for f, r in zip(fast, reference, strict=True):
        assert f.grad_sample.shape == (BATCH, *f.shape)
        torch.testing.assert_close(f.grad_sample, r.grad_sample, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.summed_grad, r.summed_grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(f.detach(), r.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_a_noised_step_matches_hooks(name: str) -> None:
    _, fast, fast_history = _step(name, _fast_mode(name), noise_multiplier=1.0)
    _, reference, reference_history = _step(name, REFERENCE_MODE, noise_multiplier=1.0)
    _, noiseless, _ = _step(name, REFERENCE_MODE, noise_multiplier=0.0)
    assert any(not torch.allclose(f, n) for f, n in zip(fast, noiseless, strict=True)), "noise was not added"
    for f, r in zip(fast, reference, strict=True):
        torch.testing.assert_close(f.detach(), r.detach(), rtol=1e-4, atol=1e-6)
    assert fast_history == reference_history == [(1.0, 1 / 3, 1)]


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_an_empty_poisson_batch_is_pure_noise_and_counted_as_with_hooks(name: str) -> None:
    empty = (torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long))
    _, fast, fast_history = _step(name, _fast_mode(name), noise_multiplier=1.0, batch=empty)

    # The reference: hooks running the empty batch through the model, as fedtrain's trainer used to.
    model = build_model(name, SHAPE, CLASSES, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    engine, private_model, optimizer = _private(model, REFERENCE_MODE, noise_multiplier=1.0)
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.CrossEntropyLoss()(private_model(empty[0]), empty[1]).backward()
    optimizer.step()

    for f, r, b in zip(fast, model.parameters(), before, strict=True):
        assert not torch.allclose(r, b), "the empty step must still add noise"
        torch.testing.assert_close(f.detach(), r.detach(), rtol=1e-5, atol=1e-7)
    assert fast_history == engine.accountant.history == [(1.0, 1 / 3, 1)]


def test_a_layer_expanded_weights_lack_falls_back_to_hooks() -> None:
    # PReLU has a weight that PyTorch's expanded weights cannot handle; Opacus's hooks can (functorch).
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.PReLU(), nn.Linear(8, CLASSES))
    assert not matches_reference(model, "ew", SHAPE, CPU)
    assert choose_grad_sample_mode(model, SHAPE, CPU) == "hooks"
    before = [p.detach().clone() for p in model.parameters()]
    engine, private_model, optimizer = _private(model, "hooks", noise_multiplier=1.0)
    private_step(private_model, optimizer, nn.CrossEntropyLoss(), *_batch())
    assert all(not torch.allclose(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert engine.accountant.history == [(1.0, 1 / 3, 1)]


def test_a_mode_whose_per_sample_gradients_differ_from_hooks_is_not_taken(monkeypatch) -> None:
    """Expanded weights told the wrong loss reduction: every per-sample gradient is off by the batch size."""
    from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    from fedtrain.clients import grad_sample_mode

    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    assert choose_grad_sample_mode(model, SHAPE, CPU) == "ew"

    def wrong_forward(self, x, *args, **kwargs):
        return call_for_per_sample_grads(self._module, batch_size=x.shape[0], loss_reduction="sum")(x, *args, **kwargs)

    monkeypatch.setattr(GradSampleModuleExpandedWeights, "forward", wrong_forward)
    grad_sample_mode._VERDICTS.clear()  # Opacus's code changed under this process: its verdicts no longer hold
    assert not matches_reference(model, "ew", SHAPE, CPU)
    assert choose_grad_sample_mode(model, SHAPE, CPU) == "hooks"


def test_a_probe_verdict_is_reused_only_for_the_same_model(monkeypatch) -> None:
    """Simulated clients of a round share one process and one global model: the probe runs once for it;
    changed weights, a changed setting, a frozen parameter, or a hook (which the fingerprint cannot
    compare) probe again."""
    from fedtrain.clients import grad_sample_mode

    probed: list[str] = []
    probe = grad_sample_mode._probe_matches

    def counted(model, mode, *args):
        probed.append(mode)
        return probe(model, mode, *args)

    monkeypatch.setattr(grad_sample_mode, "_probe_matches", counted)
    model = build_model("mlp", SHAPE, CLASSES, seed=0)
    assert matches_reference(model, "ew", SHAPE, CPU) and matches_reference(model, "ew", SHAPE, CPU)
    assert matches_reference(build_model("mlp", SHAPE, CLASSES, seed=0), "ew", SHAPE, CPU)  # an equal copy
    assert len(probed) == 1
    changed = build_model("mlp", SHAPE, CLASSES, seed=1)
    assert matches_reference(changed, "ew", SHAPE, CPU) and len(probed) == 2
    with torch.no_grad():
        next(changed.parameters())[0, 0] += 1.0
    matches_reference(changed, "ew", SHAPE, CPU)
    frozen = build_model("mlp", SHAPE, CLASSES, seed=0)
    next(frozen.parameters()).requires_grad_(False)
    matches_reference(frozen, "ew", SHAPE, CPU)
    matches_reference(model, "hooks", SHAPE, CPU)  # another mode
    assert len(probed) == 5
    # the same Linear layers around a different activation: the verdicts differ, and neither is reused
    swapped = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.PReLU(), nn.Linear(8, CLASSES))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    plain.load_state_dict({k: v for k, v in swapped.state_dict().items() if not k.startswith("2.")})
    assert not matches_reference(swapped, "ew", SHAPE, CPU) and matches_reference(plain, "ew", SHAPE, CPU)
    assert len(probed) == 7
    model[2].register_forward_hook(lambda *_: None)
    assert grad_sample_mode.model_fingerprint(model) is None
    matches_reference(model, "ew", SHAPE, CPU)
    matches_reference(model, "ew", SHAPE, CPU)
    assert len(probed) == 9
