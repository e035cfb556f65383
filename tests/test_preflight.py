"""The DP preflight refuses, before any training, each setup that would silently break the guarantee
(one sentence each), and lets correct setups through: built-in models in both Opacus modes, dropout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn
from torch.utils.data import DataLoader

from fedtrain import protocol
from fedtrain.clients import handlers, trainer
from fedtrain.clients.setup import ClientSetup
from fedtrain.clients.trainer import TensorItems, TrainSettings, planned_round, private_training, train_round
from fedtrain.config import Config
from fedtrain.data import ArrayDataset
from fedtrain.errors import FedtrainError
from fedtrain.models import build_model
from fedtrain.privacy import preflight
from fedtrain.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtrain.privacy.preflight import PreflightRefusal, PrivateSetup
from fedtrain.tasks import Classification
from tests.inprocess import flower_task, train_message

CPU = torch.device("cpu")
SETTINGS = TrainSettings(16, 1, 0.5, 0.0, 1.0)


def _data(n: int = 64, features: int = 4) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.random((n, features), dtype=np.float32)
    return ArrayDataset(x, (np.arange(n) % 3).astype(np.int64), ["a", "b", "c"])


def _setup(model: nn.Module, data: ArrayDataset, noise: float = 1.0) -> PrivateSetup:
    ledger = PrivacyLedger(delta=1e-5)
    return private_training(model, data, SETTINGS, noise, ledger, CPU, Classification()).setup


def _refusal(
    setup: PrivateSetup, data: ArrayDataset, noise: float = 1.0, planned: LedgerEntry | None = None
) -> str | None:
    planned = planned or planned_round(len(data), SETTINGS, noise)
    return preflight.refusal(setup, planned, len(data), SETTINGS.batch_size, preflight.probe_batch(data, CPU))


class BatchMean(nn.Module):
    """Subtracts the batch's mean: no parameters, nothing Opacus's validator knows, yet it mixes samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


# ---------------------------------------------------------------- correct setups pass


@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_built_in_models_pass(name: str) -> None:
    data = _data()
    assert _refusal(_setup(build_model(name, [4], 3, seed=0), data), data) is None


def test_the_cnn_in_the_cpus_fast_mode_and_dropout_pass() -> None:
    rng = np.random.default_rng(1)
    images = ArrayDataset(rng.random((32, 1, 6, 6), dtype=np.float32), (np.arange(32) % 3).astype(np.int64))
    cnn = build_model("cnn", [1, 6, 6], 3, seed=0)
    setup = _setup(cnn, images)
    assert type(setup.model).__name__ == "GradSampleModuleExpandedWeights"  # ew: its per-sample rows checked too
    assert _refusal(setup, images) is None
    data = _data()
    dropout = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    assert _refusal(_setup(dropout, data), data) is None


class FrozenEncoder(nn.Module):
    """A frozen transformer layer (dropout modules, and attention dropout that is not a module) under a
    trainable head, as examples/text_adapters.py: nothing here mixes the examples of a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Linear(1, 8).requires_grad_(False)
        layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, dropout=0.5, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.lift(x.unsqueeze(-1))).mean(dim=1))


def test_a_frozen_transformer_with_attention_dropout_passes() -> None:
    data = _data()
    for _ in range(3):  # dropout draws differ each time: none may look like mixing
        assert _refusal(_setup(FrozenEncoder(), data), data) is None


def test_the_checks_leave_model_and_optimizer_as_they_were() -> None:
    data = _data()
    model = build_model("logistic", [4], 3, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    setup = _setup(model, data)
    assert _refusal(setup, data) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- sampling


def test_a_fixed_size_batch_loader_is_refused() -> None:
    data = _data()
    setup = _setup(build_model("logistic", [4], 3, seed=0), data)
    fixed = dataclasses.replace(setup, loader=DataLoader(TensorItems(data), batch_size=16, shuffle=True))
    reason = _refusal(fixed, data)
    assert reason is not None and "fixed-size batches of 16" in reason and "Poisson" in reason


def test_a_sample_rate_that_does_not_match_the_split_is_refused() -> None:
    """70 examples in batches of 16: Opacus makes q = 1/len(loader) = 1/5, which the ledger records. A
    loader that drops the last short batch has 4 batches, so Opacus would sample at 1/4 while the ledger
    (and the split) say 1/5."""
    data = _data(70)
    model = build_model("logistic", [4], 3, seed=0)
    dropping = DataLoader(TensorItems(data), batch_size=16, drop_last=True)
    engine = __import__("opacus").PrivacyEngine(accountant="rdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private_model, private_optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=dropping, noise_multiplier=1.0, max_grad_norm=1.0
    )
    setup = PrivateSetup(private_model, private_optimizer, loader, trainer.TaskLoss(Classification()))
    reason = _refusal(setup, data)
    assert reason is not None and "probability 0.25" in reason and "records 0.2" in reason
    # and a ledger entry that does not match a correct loader
    good = _setup(build_model("logistic", [4], 3, seed=0), data)
    reason = _refusal(good, data, planned=LedgerEntry(1.0, 0.5, 5))
    assert reason is not None and "the ledger records 0.5" in reason


# ---------------------------------------------------------------- noise


def test_a_noise_multiplier_of_zero_presented_as_private_is_refused() -> None:
    data = _data()
    setup = _setup(build_model("logistic", [4], 3, seed=0), data, noise=0.0)
    reason = _refusal(setup, data, noise=0.0)
    assert reason is not None and "noise multiplier of 0 adds no noise" in reason and "infinite" in reason


def test_noise_other_than_the_ledgers_is_refused() -> None:
    data = _data()
    setup = _setup(build_model("logistic", [4], 3, seed=0), data, noise=0.5)
    reason = _refusal(setup, data, planned=planned_round(len(data), SETTINGS, 1.0))
    assert reason is not None and "multiplier 0.5 but the ledger records 1" in reason


# ---------------------------------------------------------------- samples kept apart


def test_batchnorm_left_in_is_refused_by_name() -> None:
    data = _data()
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    reason = preflight.mixing_refusal(model, preflight.probe_batch(data, CPU)[0])
    assert reason is not None and "layer '1' (BatchNorm1d) mixes the examples of a batch" in reason
    assert model[1].running_mean.abs().sum() == 0  # the probe left its running statistics as they were


def test_a_custom_cross_sample_layer_is_refused_by_name() -> None:
    data = _data()
    model = nn.Sequential(nn.Linear(4, 8), BatchMean(), nn.Linear(8, 3))
    reason = _refusal(_setup(model, data), data)
    assert reason is not None and "layer '1' (BatchMean) mixes the examples of a batch" in reason


def test_a_trainable_parameter_without_per_sample_gradient_is_refused() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    data = _data()
    reason = _refusal(_setup(Unused(), data), data)
    assert reason is not None and "trainable parameter 'spare.weight' receives no per-sample gradient" in reason


def test_a_loss_summed_over_the_batch_does_not_match_the_noise_scaling() -> None:
    """Opacus scales per-sample gradients for a mean loss; a summed one makes every row B times the
    example's own gradient (2: the probe's two examples)."""
    data = _data()
    setup = _setup(build_model("logistic", [4], 3, seed=0), data)
    summed = dataclasses.replace(setup, criterion=lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum"))
    reason = _refusal(summed, data)
    assert reason is not None and "2 times each example's own gradient" in reason and "reduction" in reason


def test_a_loss_that_couples_examples_is_refused() -> None:
    data = _data()
    setup = _setup(build_model("logistic", [4], 3, seed=0), data)

    def coupled(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # weights from the whole batch's losses
        losses = nn.functional.cross_entropy(out, y, reduction="none")
        return (losses * torch.softmax(losses, dim=0)).sum()

    reason = _refusal(dataclasses.replace(setup, criterion=coupled), data)
    assert reason is not None and "depends on the other examples of its batch" in reason


class SummedLoss(Classification):
    """A user task whose loss is already reduced: one number for the batch, not one per example."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="sum")


def test_the_trainer_refuses_before_its_first_step() -> None:
    data = _data()
    model = build_model("logistic", [4], 3, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PrivacyLedger(delta=1e-5)
    with pytest.raises(PreflightRefusal, match="times each example's own gradient"):
        train_round(model, data, SETTINGS, 1.0, ledger, CPU, SummedLoss())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ledger.entries == []


# ---------------------------------------------------------------- on the client, and in simulation


def test_a_client_refuses_in_its_own_words_and_spends_nothing(monkeypatch) -> None:
    """A loader that is not Poisson (Opacus asked for fixed-size batches) reaches a client's handler: it
    replies with a refusal of the run, before any step, and its ledger holds nothing."""
    from opacus import PrivacyEngine

    real = PrivacyEngine.make_private
    monkeypatch.setattr(
        PrivacyEngine, "make_private", lambda self, **kw: real(self, **{**kw, "poisson_sampling": False})
    )
    config = Config(
        rounds=2, clients=2, input_shape=[1, 8, 8], labels=[str(i) for i in range(10)], batch_size=100
    )  # the batch the refusal names (unset, the client's rule chooses it)
    model = build_model("logistic", [1, 8, 8], 10, seed=0)
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    with flower_task():
        reply = protocol.read_reply(handlers.handle_train(train_message(model.state_dict()), context,
                                                          config, ClientSetup()))  # fmt: skip
    assert reply.kind == "refused" and reply.refusal_kind == protocol.POLICY
    assert reply.reason.startswith("client-0 refuses this run: the data loader draws fixed-size batches of 100")
    assert reply.privacy is not None and reply.privacy.ledger.entries == [] and reply.privacy.epsilon == 0


def test_simulation_refuses_a_model_that_mixes_samples_before_anything_starts(tmp_path) -> None:
    import fedtrain

    def mixing(input_shape: list[int], num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), BatchMean(), nn.Linear(16, num_classes))

    with pytest.raises(FedtrainError, match="DP preflight refuses this run: layer '2' \\(BatchMean\\) mixes"):
        fedtrain.simulate(model=mixing, clients=2, rounds=1, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
