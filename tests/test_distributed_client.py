"""One client's round split across local processes (`fedtrain client --processes N`, gloo on CPU) is the
round one process trains: the same Poisson samples, the same noise added once, the same ledger entry.

References: the single-process trainer (Opacus's own, non-distributed DPOptimizer and sampler) on the
same seeds, and for the noise a DP-SGD step computed here by hand (each example's gradient on its own,
clipped, summed, plus the Gaussian draw of the noise seed), which a version adding noise on every rank
fails. A rank that dies or hangs ends the round with one sentence, and every rank is stopped.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

from fedtrain import protocol
from fedtrain.clients import handlers, trainer
from fedtrain.clients.local_processes import processes_refusal, train_in_processes
from fedtrain.clients.setup import ClientSetup
from fedtrain.clients.trainer import RoundResult, Seeds, TaskLoss, TrainSettings, planned_round, train_round
from fedtrain.config import Config
from fedtrain.data import ArrayDataset
from fedtrain.errors import FedtrainError
from fedtrain.models import build_model
from fedtrain.privacy.ledger import PrivacyLedger
from fedtrain.tasks import Classification
from tests.conftest import run_cli
from tests.inprocess import flower_task, train_message

SHAPE = [1, 8, 8]
CLASSES = 10
CPU = torch.device("cpu")
CLIP = 0.05  # most examples are clipped, so clipping is part of what is compared
SETTINGS = TrainSettings(batch_size=16, local_epochs=2, lr=0.5, momentum=0.9, max_grad_norm=CLIP)
SEEDS = Seeds(sampling=11, noise=22)
ROUND_TIMEOUT = 60.0  # seconds for a round in processes; one takes about 1-2 s quiet
RTOL, ATOL = 1e-5, 1e-7


def _data(count: int = 96) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.random((count, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, count))


def _single(name: str, data: ArrayDataset, settings: TrainSettings, seeds: Seeds = SEEDS):
    model = build_model(name, SHAPE, CLASSES, seed=0)
    result = train_round(model, data, settings, 1.0, PrivacyLedger(1e-5), CPU, Classification(), seeds=seeds)
    return model, result


def _split(name: str, data: ArrayDataset, settings: TrainSettings, seeds: Seeds = SEEDS, processes: int = 2,
           timeout: float = ROUND_TIMEOUT) -> tuple[torch.nn.Module, RoundResult]:  # fmt: skip
    model = build_model(name, SHAPE, CLASSES, seed=0)
    planned = planned_round(len(data), settings, 1.0)
    result = train_in_processes(model, data, settings, 1.0, PrivacyLedger(1e-5), CPU, Classification(), planned,
                                processes, timeout, seeds)  # fmt: skip
    return model, result


def _close(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.allclose(p, q, rtol=RTOL, atol=ATOL) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "physical"), [("mlp", None), ("cnn", None), ("mlp", 5)])
def test_two_processes_train_the_single_process_round(name: str, physical: int | None) -> None:
    """Two epochs with momentum, most examples clipped, sigma 1: the same parameters and ledger entry as
    one process (also when each rank computes its share in physical chunks); other seeds would not pass."""
    data = _data()
    settings = dataclasses.replace(SETTINGS, max_physical_batch_size=physical)
    single, single_result = _single(name, data, settings)
    split, split_result = _split(name, data, settings)
    assert _close(single, split)
    assert split_result.entry == single_result.entry == planned_round(len(data), settings, 1.0)
    assert split_result.loss == pytest.approx(single_result.loss, rel=1e-5)  # over both ranks' examples
    if name == "mlp" and physical is None:  # the comparison can fail: other noise or samples, other parameters
        assert not _close(single, _split(name, data, settings, Seeds(SEEDS.sampling, SEEDS.noise + 1))[0])
        assert not _close(single, _split(name, data, settings, Seeds(SEEDS.sampling + 1, SEEDS.noise))[0])


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_shares_are_the_single_process_batch(world: int) -> None:
    """Against Opacus's own single-process Poisson sampler on the same seed: every step, the ranks' shares
    are disjoint and together its batch, and every rank yields every step (empty shares included)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedtrain.clients.data_parallel import Ranks, SplitPoissonSampler

    rate = 1 / 20  # about 2 examples a step over 40: many empty shares
    single = list(UniformWithReplacementSampler(num_samples=40, sample_rate=rate,
                                                generator=torch.Generator().manual_seed(5)))  # fmt: skip
    shares = [list(SplitPoissonSampler(num_samples=40, sample_rate=rate, generator=torch.Generator().manual_seed(5),
                                       ranks=Ranks(rank, world))) for rank in range(world)]  # fmt: skip
    assert all(len(share) == len(single) == 20 for share in shares)
    assert any(len(share[step]) == 0 < len(single[step]) for share in shares for step in range(20))
    for step, batch in enumerate(single):
        parts = [share[step] for share in shares]
        assert sorted(i for part in parts for i in part) == sorted(batch)  # disjoint, and the whole batch


def _by_hand(model: torch.nn.Module, data: ArrayDataset, noise_draws: int) -> list[torch.Tensor]:
    """One DP-SGD step over the whole split (q = 1), lr 1, without Opacus: each example's own gradient,
    clipped to CLIP, summed, plus `noise_draws` times the Gaussian noise of the seed, over the batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = TaskLoss(Classification())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(data)):
        x, y = data[i]
        grads = torch.autograd.grad(loss(model(torch.from_numpy(x)[None]), torch.as_tensor(y)[None]), params)
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads, strict=True)]
    generator = torch.Generator().manual_seed(SEEDS.noise)
    noise = [torch.normal(0.0, 1.0 * CLIP, size=p.shape, generator=generator) for p in params]
    return [(p - (t + noise_draws * z) / len(data)).detach() for p, t, z in zip(params, total, noise, strict=True)]


@pytest.mark.timeout(120)
def test_noise_is_added_once_for_the_whole_batch(monkeypatch) -> None:
    """One step over 24 examples (q = 1) split in two: the result is the hand-computed step with one noise
    draw; a version whose every rank adds noise gives the step with two draws, and fails the comparison."""
    data = _data(24)
    settings = dataclasses.replace(SETTINGS, batch_size=24, local_epochs=1, lr=1.0, momentum=0.0)
    once, twice = (_by_hand(build_model("mlp", SHAPE, CLASSES, seed=0), data, draws) for draws in (1, 2))
    split, result = _split("mlp", data, settings)
    assert result.entry.steps == 1 and result.entry.sample_rate == 1.0
    trained = [p.detach() for p in split.parameters()]
    assert all(torch.allclose(a, b, rtol=RTOL, atol=1e-6) for a, b in zip(trained, once, strict=True))

    monkeypatch.setattr(DistributedDPOptimizer, "add_noise", DPOptimizer.add_noise)  # noise on every rank
    doubled = [p.detach() for p in _split("mlp", data, settings)[0].parameters()]
    assert not all(torch.allclose(a, b, rtol=RTOL, atol=1e-6) for a, b in zip(doubled, once, strict=True))
    assert all(torch.allclose(a, b, rtol=RTOL, atol=1e-6) for a, b in zip(doubled, twice, strict=True))


def _fail_on_rank_one(monkeypatch, fail) -> None:
    real = trainer.private_step

    def step(*args, **kwargs):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            fail()
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "private_step", step)  # the ranks are forked: they run it


@pytest.mark.timeout(60)
def test_a_rank_that_dies_ends_the_round_with_one_sentence(monkeypatch) -> None:
    _fail_on_rank_one(monkeypatch, lambda: os._exit(3))
    started = time.monotonic()
    with pytest.raises(FedtrainError, match=r"^training process 1 of 2 stopped without a result \(exit status 3\)"):
        _split("mlp", _data(), SETTINGS)
    assert time.monotonic() - started < ROUND_TIMEOUT / 2  # noticed at once, not at the deadline
    assert multiprocessing.active_children() == []  # rank 0, waiting in its all-reduce, was stopped


@pytest.mark.timeout(60)
def test_a_rank_that_hangs_is_stopped_at_the_deadline(monkeypatch) -> None:
    _fail_on_rank_one(monkeypatch, lambda: time.sleep(600))
    started = time.monotonic()
    with pytest.raises(FedtrainError, match=r"^training in 2 processes did not finish within 5 s"):
        _split("mlp", _data(), SETTINGS, timeout=5)
    assert time.monotonic() - started < 25
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("processes", "settings", "message"),
    [
        (0, SETTINGS, "processes must be at least 1, not 0."),
        (-2, SETTINGS, "processes must be at least 1, not -2."),
        (17, SETTINGS, "17 processes are more than the 16 examples of an expected Poisson batch"),
        (2, dataclasses.replace(SETTINGS, grad_sample_mode="ghost"), "ghost clipping is not supported"),
    ],
)
def test_settings_that_cannot_run_are_refused(processes: int, settings: TrainSettings, message: str) -> None:
    reason = processes_refusal(processes, 96, settings, CPU)
    assert reason is not None and reason.startswith(message)
    assert processes_refusal(1, 96, settings, CPU) is None  # one process: nothing to split
    assert processes_refusal(2, 96, SETTINGS, CPU) is None


# ---------------------------------------------------------------- on the client


def _client_round(processes: object, **config) -> protocol.Reply:
    config = Config(rounds=2, clients=2, input_shape=SHAPE, labels=[str(i) for i in range(CLASSES)], **config)
    model = build_model("logistic", SHAPE, CLASSES, seed=0)
    context = Context(1, 1, {"partition-id": 0, "processes": processes}, RecordDict(), {})
    with flower_task():
        reply = handlers.handle_train(train_message(model.state_dict()), context, config, ClientSetup())
    return protocol.read_reply(reply)


@pytest.mark.timeout(120)
def test_a_client_in_two_processes_records_the_single_process_entry() -> None:
    one, two = _client_round(1), _client_round(2)
    assert one.kind == two.kind == "update"
    assert one.privacy is not None and two.privacy is not None
    assert two.privacy.ledger.entries == one.privacy.ledger.entries
    assert [e.kind for e in two.privacy.ledger.entries] == ["train", "metrics"]  # one entry each, not one per rank
    assert two.privacy.epsilon == one.privacy.epsilon > 0
    assert two.metrics[protocol.NUM_EXAMPLES] == one.metrics[protocol.NUM_EXAMPLES]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("processes", "config"),
    [(0, {}), ("two", {}), (10_000, {}), (2, {"grad_sample_mode": "ghost"})],
)
def test_a_client_refuses_a_bad_setting_before_training(processes: object, config: dict, caplog) -> None:
    reply = _client_round(processes, **config)
    assert reply.kind == "error" and reply.reason == "internal error"  # the sentence stays in the client's log
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("processes" in line or "ghost clipping" in line for line in logged), logged


def test_the_cli_refuses_zero_processes(tmp_path, capsys) -> None:
    code, _, err = run_cli(["client", "--kit", str(tmp_path), "--server", "127.0.0.1:1", "--data", str(tmp_path),
                            "--processes", "0"], capsys)  # fmt: skip
    assert code == 2, err
    assert "Traceback" not in err and "--processes must be at least 1, not 0." in " ".join(err.split())
