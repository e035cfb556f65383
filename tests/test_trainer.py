"""Local DP-SGD round: FedProx's proximal step is applied after the private step; empty Poisson batches."""

from __future__ import annotations

import numpy as np
import torch

from fedtrain.clients.grad_sample_mode import choose_grad_sample_mode
from fedtrain.clients.trainer import TrainSettings, planned_round, train_round
from fedtrain.data import ArrayDataset
from fedtrain.models import build_model
from fedtrain.privacy.ledger import PrivacyLedger


def _round(proximal_mu: float) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((64, 4), dtype=np.float32), (np.arange(64) % 3).astype(np.int64), ["a", "b", "c"])
    model = build_model("logistic", [4], 3, seed=0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(16, 2, 0.5, 0.0, 1.0, proximal_mu=proximal_mu)
    result = train_round(model, data, settings, 1.0, PrivacyLedger(delta=1e-5), torch.device("cpu"))
    assert result.entry.steps == 8
    return before, model.state_dict()


def test_a_full_proximal_step_pulls_the_model_back_to_the_global_weights() -> None:
    # lr * mu = 1: after every private step, w <- w - (w - w_t) = w_t, whatever the noise and sampling did
    before, after = _round(proximal_mu=2.0)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v)


def test_without_the_proximal_term_the_model_moves() -> None:
    before, after = _round(proximal_mu=0.0)
    assert any(not torch.allclose(after[k], v) for k, v in before.items())


def test_a_round_full_of_empty_poisson_batches_trains_with_the_cpu_fast_mode() -> None:
    # Batch size 1 of 32 samples: Poisson rate 1/32, so about a third of the 64 steps draw no sample at all
    # (all 64 drawing one is a 1e-12 chance). Expanded weights, the CPU's mode for the CNN, refuse such
    # batches: the trainer must still run them as noise-only steps and count each one.
    rng = np.random.default_rng(0)
    data = ArrayDataset(
        rng.random((32, 1, 6, 6), dtype=np.float32), (np.arange(32) % 3).astype(np.int64), ["a", "b", "c"]
    )
    model = build_model("cnn", [1, 6, 6], 3, seed=0)
    assert choose_grad_sample_mode(model, [1, 6, 6], torch.device("cpu")) == "ew"
    before = [p.detach().clone() for p in model.parameters()]
    settings = TrainSettings(1, 2, 0.1, 0.0, 1.0)
    result = train_round(model, data, settings, 1.0, PrivacyLedger(delta=1e-5), torch.device("cpu"))
    assert result.entry == planned_round(32, settings, 1.0)
    assert result.entry.steps == 64 and np.isfinite(result.loss) and result.loss > 0
    assert all(
        torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
    )


def test_large_logical_batches_run_in_physical_chunks_with_one_dp_step_each(monkeypatch) -> None:
    """BatchMemoryManager: no chunk exceeds max_physical_batch_size, yet privacy counts one step per
    logical (Poisson) batch, exactly as planned without it."""
    import fedtrain.clients.trainer as trainer

    seen, real = [], trainer.private_step
    monkeypatch.setattr(
        trainer, "private_step", lambda m, o, c, x, y, *a: (seen.append(len(y)), real(m, o, c, x, y, *a))[1]
    )
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.random((64, 4), dtype=np.float32), (np.arange(64) % 3).astype(np.int64), ["a", "b", "c"])
    settings = TrainSettings(32, 2, 0.5, 0.0, 1.0, max_physical_batch_size=5)
    model = build_model("logistic", [4], 3, seed=0)
    result = train_round(model, data, settings, 1.0, PrivacyLedger(delta=1e-5), torch.device("cpu"))
    assert result.entry == planned_round(64, settings, 1.0) and result.entry.steps == 4
    assert max(seen) <= 5 and len(seen) > 4 * 2  # every logical batch of about 32 came in chunks
    assert np.isfinite(result.loss)
