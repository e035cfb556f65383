"""Many simulated clients, all training (issue 17): Flower's message store must not go back to checking
every stored message on every node's poll (nodes x messages work every 0.1 s, which kept 1000 clients
from finishing a round). Checked by a count, not a timing: each train message is validated once, when
its node gets it. Each client still keeps its own sealed ledger. benchmarks/simulation_scale.py times
10, 100 and 1000 clients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedtrain import _flower

pytestmark = pytest.mark.e2e

CLIENTS = 200


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 8x8 images: a template per class plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, size=(10, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    return np.clip(templates[y] + rng.normal(0, 0.3, size=(n, 1, 8, 8)), 0, 1).astype(np.float32), y.astype(np.int64)


@pytest.mark.own_process  # starts Ray in-process (tests/conftest.py)
@pytest.mark.timeout(300)  # 53-89 s at load 7-19 here (quiet not measured)
def test_200_clients_all_training_cost_the_message_store_one_check_per_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedtrain

    states: list[_flower.IndexedLinkState] = []

    class Counted(_flower.IndexedLinkState):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.stored = 0
            states.append(self)

        def store_message_ins(self, message):
            message_id = super().store_message_ins(message)
            self.stored += message_id is not None
            return message_id

    monkeypatch.setattr(_flower, "IndexedLinkState", Counted)
    x, y = _images(CLIENTS * 20)
    np.savez(tmp_path / "data.npz", x=x, y=y)  # a file, as `fedtrain simulate --data` reads it
    result = fedtrain.simulate(
        data=tmp_path / "data.npz",
        model="logistic",
        clients=CLIENTS,
        rounds=1,
        target_epsilon=None,
        noise_multiplier=1.0,
        accountant="rdp",
        batch_size=10,
        local_epochs=1,
        fraction_evaluate=0.0,
        run_dir=tmp_path / "run",
    )
    (row,) = result.history
    assert row["clients_ok"] == CLIENTS and not row["failed"] and not row["refused"]
    (state,) = states
    assert state.stored == CLIENTS  # one train message per client
    # Flower's own state checks every stored message up to the node's own on its first poll (n (n + 1) / 2 =
    # 20,100 here) and all of them on every later poll of every node; the indexed one, each message once
    assert state.validated == state.stored
    assert state.undelivered() == 0
    # isolation of privacy: every client has its own sealed ledger, with this round on it
    ledgers = sorted(p.name for p in (tmp_path / "run" / "ledgers").iterdir())
    assert ledgers == sorted(f"client-{i}" for i in range(CLIENTS))
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert len(privacy["clients"]) == CLIENTS
