"""Secure aggregation (Flower's SecAgg+) through fedtrain's real server loop and real ClientApp
(mods and all: payload encryption, SecAgg+, DP-SGD on digits shards), in this process.

The test sees what the server sees (every reply it receives) and, through a spy on the client's
train handler, each client's plain update. Checked independently of fedtrain's own numbers:
- nothing the server receives holds a plain update, and each masked vector looks nothing like the
  client's quantised update (uniform over the 2^32 modulus);
- the new global model is the global model plus the uniform mean of the clients' plain updates,
  within quantisation error;
- no coordinate was clipped by quantisation (the updates lie inside the range), and one that would
  be is counted and reported;
- a client that vanishes after training (before uploading its masked vector) leaves a round that
  still completes with the mean of the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

import fedtrain.clients.handlers as client_app_module
import fedtrain.clients.secure_aggregation as client_secagg
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.security.payload import HEADER, SEALED
from fedtrain.server.loop import Federation
from fedtrain.server.payload_sealer import PayloadSealer
from fedtrain.simulation import _simulation_keys, prepare
from fedtrain.strategies import make_strategy
from tests.inprocess import AppGrid, over_the_wire
from tests.test_strategies import no_accounting, task_identity  # noqa: F401 (fixtures)

CLIENTS, BOUND, LEVELS = 4, 10.0, 2**22  # LEVELS: Flower's default quantisation range
pytestmark = pytest.mark.usefixtures("no_accounting")  # accounting is tested elsewhere; here it is time


class ClientAppGrid(AppGrid):
    """`wire` keeps every reply's (node, content) exactly as the server receives it; `plain` and
    `globals` what each client's train handler returned and was sent (from a spy), by (round, node)."""

    def __init__(self, config: Config, monkeypatch, keys_for=None, vanish: tuple[int, int] | None = None) -> None:
        super().__init__(config, keys_for=keys_for)
        self.vanish = vanish  # (round, node): that node dies after training, before it uploads
        self.wire, self.plain, self.globals = [], {}, {}
        real = client_app_module.handle_train

        def spy(msg, context, *rest):
            reply = real(msg, context, *rest)
            server_round = int(msg.content["config"]["server-round"])
            self.globals[server_round] = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
            if "arrays" in reply.content:
                self.plain[(server_round, context.node_id)] = {
                    k: v.numpy().copy() for k, v in reply.content["arrays"].items()
                }
            return reply

        monkeypatch.setattr(client_app_module, "handle_train", spy)

    def deliver(self, node, msg):
        trained = len(self.plain)
        reply = super().deliver(node, msg)
        if self.vanish == (len(self.globals), node) and len(self.plain) > trained:
            return None  # it died after training: its masked vector never arrives
        self.wire.append((node, over_the_wire(reply.content)))  # as it arrived, before any opening
        return reply


def secure_run(tmp_path, monkeypatch, *, encrypt=False, vanish=None, rounds=2, **options):
    key = write_key_file(tmp_path / "model.key", generate_key())
    config, test_set = prepare(
        Config(
            clients=CLIENTS,
            rounds=rounds,
            noise_multiplier=1.0,
            target_epsilon=None,
            fraction_evaluate=0.0,
            secure_aggregation=True,
            secagg_update_bound=BOUND,
            payload_encryption=encrypt,
            run_dir=str(tmp_path / "run"),
            key_file=str(key),
        ).replace(**options)  # fmt: skip
    )
    payload_keys, keys_for = _simulation_keys(config) if encrypt else (None, None)
    grid = ClientAppGrid(config, monkeypatch, keys_for=keys_for, vanish=vanish)
    sealer = PayloadSealer(payload_keys, run_id=1) if encrypt else None
    rows = Federation(config, test_set=test_set, on_round=lambda row: None, sealer=sealer).run(grid)
    return config, grid, rows


def bounded(d: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
    return {k: v.astype(np.float64) * min(1.0, bound / norm) for k, v in d.items()}


def assert_global_moved_by_mean(grid: ClientAppGrid, server_round: int, nodes: list[int], bound: float) -> None:
    before, after = grid.globals[server_round], grid.globals[server_round + 1]
    updates = [bounded(grid.plain[(server_round, n)], bound) for n in nodes]
    for k in before:
        mean = sum(u[k] for u in updates) / len(updates)
        step = 2 * bound / LEVELS  # one quantisation level; stochastic rounding errs by less per client
        np.testing.assert_allclose(after[k].astype(np.float64) - before[k], mean, rtol=0, atol=step + 1e-6)


def test_server_sees_only_masked_vectors_and_their_mean_is_the_plain_mean(tmp_path, monkeypatch):
    config, grid, rows = secure_run(tmp_path, monkeypatch)
    assert [row["clients_ok"] for row in rows] == [CLIENTS, CLIENTS]
    assert [row["secure_aggregation"]["values_clipped"] for row in rows] == [0, 0]
    masked = [(node, c) for node, c in grid.wire if RECORD_KEY_CONFIGS in c.config_records
              and Key.MASKED_PARAMETERS in c.config_records[RECORD_KEY_CONFIGS]]  # fmt: skip
    assert len(masked) == CLIENTS * config.federation.rounds
    for _, content in grid.wire:  # not one plain array reaches the server, in any stage
        assert all(len(record) == 0 for record in content.array_records.values())
    for index, (node, content) in enumerate(masked):
        server_round = 1 + index // CLIENTS
        vectors = [bytes_to_ndarray(b) for b in content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        received = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)
        plain = bounded(grid.plain[(server_round, node)], BOUND)
        quantised = np.concatenate([q.ravel() for q in quantize(list(plain.values()), BOUND, LEVELS)])
        assert received.size == quantised.size
        # Unmasked, every value would lie within a few levels of LEVELS / 2; masked, they spread over 2^32.
        assert np.mean(np.abs(received - quantised) < LEVELS) < 0.02
        assert 0.4 < received.mean() / 2**32 < 0.6
        assert all(abs(v).max() <= BOUND for v in plain.values())  # inside the range: nothing to clip
    for server_round in (1,):
        assert_global_moved_by_mean(grid, server_round, list(range(1, CLIENTS + 1)), BOUND)


def test_round_survives_a_client_that_dies_before_uploading(tmp_path, monkeypatch):
    # the vanished node never answers: its stage ends at round_timeout, as on a SuperLink without its heartbeats
    config, grid, rows = secure_run(tmp_path, monkeypatch, vanish=(1, 3), encrypt=True, round_timeout=3.0)
    assert rows[0]["clients_ok"] == CLIENTS - 1 and rows[0]["clients_failed"] == 1
    (reason,) = rows[0]["failed"].values()
    assert "collect_masked_vectors" in reason
    assert rows[1]["clients_ok"] == CLIENTS  # it is back in the next round
    assert_global_moved_by_mean(grid, 1, [1, 2, 4], BOUND)
    for _, content in grid.wire:  # with payload encryption, the server's transport holds only ciphertext
        assert set(content.array_records) == {SEALED} and set(content.config_records) == {HEADER}


def test_updates_larger_than_the_range_are_scaled_and_reported(tmp_path, monkeypatch):
    small = 0.05  # far below these updates' norms: every update is scaled to it
    config, grid, rows = secure_run(tmp_path, monkeypatch, rounds=2, secagg_update_bound=small)
    assert [row["secure_aggregation"]["updates_scaled"] for row in rows] == [CLIENTS, CLIENTS]
    assert [row["secure_aggregation"]["values_clipped"] for row in rows] == [0, 0]
    assert_global_moved_by_mean(grid, 1, list(range(1, CLIENTS + 1)), small)


def test_a_value_outside_the_range_is_counted_never_silent(tmp_path, monkeypatch):
    """A client whose scaling is skipped (a bug, or an old client): quantisation clips, and the count says so."""
    monkeypatch.setattr(client_secagg, "bound_update", lambda update, bound: (update, False))
    small = 0.01
    config, grid, rows = secure_run(tmp_path, monkeypatch, rounds=1, secagg_update_bound=small)
    outside = sum(int(np.sum(np.abs(v) > small)) for (r, n), d in grid.plain.items() for v in d.values())
    assert outside > 0
    assert rows[0]["secure_aggregation"]["values_clipped"] == outside


def test_bound_update() -> None:
    update, scaled = client_secagg.bound_update({"a": np.array([3.0, 4.0], dtype=np.float32)}, 1.0)
    np.testing.assert_allclose(update["a"], [0.6, 0.8], rtol=1e-6)
    assert scaled
    update, scaled = client_secagg.bound_update({"a": np.array([3.0, 4.0], dtype=np.float32)}, 5.0)
    np.testing.assert_array_equal(update["a"], [3.0, 4.0])
    assert not scaled
    with pytest.raises(FedtrainError, match="NaN or infinite"):
        client_secagg.bound_update({"a": np.array([np.nan])}, 1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "median"}, "strategy 'median' needs each one"),
        ({"central_dp": "fixed"}, "use one of central_dp and secure_aggregation"),
        ({"clients": 2}, "at least 3 clients per round"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_do(options, message) -> None:
    with pytest.raises(FedtrainError, match=message):
        make_strategy(Config(secure_aggregation=True).replace(**options))
