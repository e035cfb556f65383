"""Every strategy name, run through fedtrain's real server loop on controlled client updates, against
an aggregate computed here independently (from the published rule, with Flower's documented choices
where it makes them: FedAdam's bias correction, MultiKrum's weighted mean of the selected).

The federation is simulated in-process: a grid whose seven nodes answer each round's training
message with a fixed update d (fedtrain's reply format). The loop screens the updates, turns them
into weights w_t + d, aggregates with the named Flower strategy, checkpoints; the test reads back
the global weights each node is sent in the next round.

The malicious-client tests run fedtrain's real client handlers in-process (DP-SGD on digits shards)
with one client sending large random weights: robust strategies and the norm bound keep accuracy in
band, plain FedAvg collapses (the control).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.security.keys import generate_key, write_key_file
from fedtrain.server.loop import Federation
from fedtrain.strategies import STRATEGIES, make_strategy
from tests.inprocess import LocalGrid, flower_task

NODES = 7
ROUNDS = 3
EXAMPLES = {node: 10 * node for node in range(1, NODES + 1)}  # unequal weights, so weighting is visible


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task():
        yield


def update(server_round: int, node: int, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Node `node`'s update in `server_round`: seeded, a different scale per node (no ties for Krum)."""
    rng = np.random.default_rng(1000 * server_round + node)
    return {k: (rng.normal(size=s) * (0.5 + 0.1 * node)).astype(np.float32) for k, s in shapes.items()}


class ControlledGrid(LocalGrid):
    """A grid of NODES nodes that answer training with `update(...)` and record what they are sent."""

    def __init__(self, bad: dict[int, str] | None = None) -> None:
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # round -> global weights sent that round
        self.configs: dict[int, dict] = {}
        self.bad = bad or {}

    def get_node_ids(self) -> list[int]:
        return list(range(1, NODES + 1))

    def answer(self, msg):
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        server_round = int(msg.content["config"]["server-round"])
        self.sent[server_round] = arrays
        self.configs[server_round] = dict(msg.content["config"])
        node = msg.metadata.dst_node_id
        d = update(server_round, node, {k: v.shape for k, v in arrays.items()})
        kind = self.bad.get(node)
        if kind == "nan":
            d[next(iter(d))][0] = np.nan
        elif kind == "huge":
            d = {k: v * 1e4 for k, v in d.items()}
        elif kind == "shape":
            d = {k: np.zeros(v.shape + (1,), v.dtype) for k, v in d.items()}
        metrics = MetricRecord({"num-examples": EXAMPLES[node], "train-loss": 0.5})
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in d.items()}), "metrics": metrics})
        return Message(content, reply_to=msg)


def run(tmp_path, strategy: str, rounds: int = ROUNDS, grid: ControlledGrid | None = None, **options):
    key = write_key_file(tmp_path / "model.key", generate_key())
    config = Config(
        clients=NODES, rounds=rounds, input_shape=[4], num_classes=3, fraction_evaluate=0.0,
        run_dir=str(tmp_path / "run"), key_file=str(key), strategy=strategy,
    ).replace(**options)  # fmt: skip
    grid = grid or ControlledGrid()
    federation = Federation(config, on_round=lambda row: None)
    rows = federation.run(grid)
    return grid, rows


# ---- independent references: (global weights, {node: update}) -> next global weights ----


def _stack(ws: dict[str, np.ndarray], ds: dict[int, dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([ws[key] + ds[n][key] for n in sorted(ds)])  # client weights, one row per node


def weighted_mean(ws, ds, nodes=None):
    nodes = sorted(ds) if nodes is None else nodes
    total = sum(EXAMPLES[n] for n in nodes)
    return {k: sum(EXAMPLES[n] * (w + ds[n][k]) for n in nodes) / total for k, w in ws.items()}


def krum_scores(ws, ds, f):
    flat = {n: np.concatenate([(ws[k] + ds[n][k]).ravel() for k in sorted(ws)]) for n in ds}
    nodes = sorted(ds)
    closest = max(1, len(nodes) - f - 2)
    scores = {}
    for a in nodes:
        dists = sorted(float(np.sum((flat[a] - flat[b]) ** 2)) for b in nodes if b != a)
        scores[a] = sum(dists[:closest])
    return sorted(nodes, key=scores.get)


class Reference:
    """Stateful references, one instance per run (momentum and moments carry across rounds)."""

    def __init__(self, name: str, **p) -> None:
        self.name, self.p, self.state = name, p, {}

    def __call__(self, server_round: int, ws, ds):
        name, p = self.name, self.p
        if name in ("fedavg", "fedprox"):
            return weighted_mean(ws, ds)
        if name == "median":
            return {k: np.median(_stack(ws, ds, k), axis=0) for k in ws}
        if name == "trimmed-mean":
            cut = int(p["trim_beta"] * len(ds))
            return {k: np.sort(_stack(ws, ds, k), axis=0)[cut : len(ds) - cut].mean(axis=0) for k in ws}
        if name == "krum":
            best = krum_scores(ws, ds, p["num_malicious"])[0]
            return {k: ws[k] + ds[best][k] for k in ws}
        if name == "multikrum":
            return weighted_mean(ws, ds, krum_scores(ws, ds, p["num_malicious"])[: p["num_selected"]])
        if name == "bulyan":  # El Mhamdi et al. 2018: theta by (multi-)Krum, then beta closest to the median
            f = p["num_malicious"]
            theta, beta = len(ds) - 2 * f, len(ds) - 4 * f
            chosen = krum_scores(ws, ds, f)[:theta]
            out = {}
            for k in ws:
                stack = np.stack([ws[k] + ds[n][k] for n in chosen])
                med = np.median(stack, axis=0)
                order = np.argsort(np.abs(stack - med), axis=0)[:beta]
                out[k] = np.take_along_axis(stack, order, axis=0).mean(axis=0)
            return out
        avg = weighted_mean(ws, ds)
        delta = {k: avg[k] - ws[k] for k in ws}
        if name == "fedavgm":
            grad = {k: -delta[k] for k in ws}
            v = self.state.get("v")
            v = grad if v is None else {k: p["server_momentum"] * v[k] + grad[k] for k in ws}
            self.state["v"] = v
            return {k: ws[k] - p["server_lr"] * v[k] for k in ws}
        # Reddi et al. 2021 (Adaptive Federated Optimization), Algorithm 2
        b1 = 0.0 if name == "fedadagrad" else p["beta_1"]
        m = {k: b1 * self.state.get("m", {}).get(k, 0.0) + (1 - b1) * delta[k] for k in ws}
        v_old = self.state.get("v", {k: np.zeros_like(ws[k]) for k in ws})
        if name == "fedadagrad":
            v = {k: v_old[k] + delta[k] ** 2 for k in ws}
        elif name == "fedyogi":
            v = {k: v_old[k] - (1 - p["beta_2"]) * delta[k] ** 2 * np.sign(v_old[k] - delta[k] ** 2) for k in ws}
        else:
            v = {k: p["beta_2"] * v_old[k] + (1 - p["beta_2"]) * delta[k] ** 2 for k in ws}
        self.state.update(m=m, v=v)
        eta = p["server_lr"]
        if name == "fedadam":  # Flower's FedAdam adds a bias correction, with exponent round + 1
            eta *= np.sqrt(1 - p["beta_2"] ** (server_round + 1)) / (1 - p["beta_1"] ** (server_round + 1))
        return {k: ws[k] + eta * m[k] / (np.sqrt(v[k]) + p["tau"]) for k in ws}


CASES = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.1},
    "fedadam": {"server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.05, "tau": 1e-3},
    "fedavgm": {"server_lr": 0.7, "server_momentum": 0.9},
    "krum": {"num_malicious": 1},
    "multikrum": {"num_malicious": 1, "num_selected": 3},
    "bulyan": {"num_malicious": 1},
    "median": {},
    "trimmed-mean": {"trim_beta": 0.2},
}


def test_every_registered_strategy_has_a_case() -> None:
    assert set(CASES) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_aggregate_matches_the_independent_reference(tmp_path, name: str) -> None:
    grid, rows = run(tmp_path, name, **CASES[name])
    assert [row["clients_ok"] for row in rows] == [NODES] * ROUNDS
    reference = Reference(name, **{**CASES[name], **_flower_defaults(name, CASES[name])})
    for server_round in range(1, ROUNDS):
        ws = grid.sent[server_round]
        ds = {n: update(server_round, n, {k: v.shape for k, v in ws.items()}) for n in grid.get_node_ids()}
        expected = reference(server_round, {k: v.astype(np.float64) for k, v in ws.items()}, ds)
        for k, got in grid.sent[server_round + 1].items():
            np.testing.assert_allclose(got, expected[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} round {server_round}")
    if name == "fedprox":
        assert grid.configs[1]["proximal-mu"] == pytest.approx(0.1)  # what the clients' trainer applies


def _flower_defaults(name: str, options: dict) -> dict:
    return {"server_lr": options.get("server_lr", 1.0)} if name == "fedavgm" else {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'"),
        ({"strategy": "fedprox"}, "fedprox needs proximal_mu > 0"),
        ({"strategy": "krum", "num_malicious": 3}, "krum with num_malicious = 3 needs at least 9 clients"),
        ({"strategy": "bulyan", "num_malicious": 2}, "bulyan with num_malicious = 2 needs at least 11 clients"),
        ({"strategy": "multikrum", "num_malicious": 1, "num_selected": 7}, "num_selected must be between 1 and"),
        ({"strategy": "trimmed-mean", "trim_beta": 0.5}, "trim_beta must be in"),
        ({"strategy": "fedadam", "beta_1": 1.0}, "beta_1 must be in"),
        ({"strategy": "fedavgm", "server_lr": -1.0}, "server_lr must be greater than 0"),
    ],
)
def test_bad_strategy_parameters_are_one_sentence(options: dict, message: str) -> None:
    with pytest.raises(FedtrainError, match=message):
        make_strategy(Config(clients=NODES).replace(**options))


@pytest.mark.parametrize("kind", ["nan", "huge", "shape"])
def test_a_bad_update_is_rejected_with_its_reason_and_never_reaches_the_model(tmp_path, kind: str) -> None:
    grid, rows = run(tmp_path, "fedavg", rounds=2, grid=ControlledGrid(bad={3: kind}), max_update_norm=100.0)
    assert [row["clients_ok"] for row in rows] == [NODES - 1] * 2
    reason = rows[0]["failed"]["node-3"]
    assert {"nan": "NaN or infinite", "huge": "exceeds max_update_norm = 100", "shape": "has shape"}[kind] in reason
    ws = grid.sent[1]
    ds = {n: update(1, n, {k: v.shape for k, v in ws.items()}) for n in grid.get_node_ids() if n != 3}
    expected = weighted_mean({k: v.astype(np.float64) for k, v in ws.items()}, ds)
    for k, got in grid.sent[2].items():
        np.testing.assert_allclose(got, expected[k], rtol=1e-4, atol=1e-5)


class InProcessFederation(LocalGrid):
    """A grid whose nodes run fedtrain's real train and evaluate handlers in this process (DP-SGD on
    their digits shard, ledger and all), without Ray; node `attacker` replaces its update by `attack`."""

    def __init__(self, config: Config, attacker: int, attack) -> None:
        from flwr.app import Context

        self.config, self.attacker, self.attack = config, attacker, attack
        self.contexts = {
            pid + 1: Context(
                1, pid + 1, {"partition-id": pid, "num-partitions": config.federation.clients}, RecordDict(), {}
            )
            for pid in range(config.federation.clients)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def answer(self, msg):
        from fedtrain.clients.handlers import handle_evaluate, handle_train

        node = msg.metadata.dst_node_id
        handler = handle_train if msg.metadata.message_type == "train" else handle_evaluate
        reply = handler(msg, self.contexts[node], self.config)
        if handler is handle_train and node == self.attacker:
            update = reply.content["arrays"]
            reply.content["arrays"] = ArrayRecord({k: Array(self.attack(v.numpy())) for k, v in update.items()})
        return reply


@pytest.fixture
def no_accounting(monkeypatch):
    """Accounting is tested in test_privacy_references.py; here it would be 90% of the run time."""
    from fedtrain.privacy.ledger import PrivacyLedger

    monkeypatch.setattr(PrivacyLedger, "epsilon", lambda self, *extra: 0.0)


def _poisoned_run(tmp_path, strategy: str, **options) -> list[dict]:
    """Six digits clients, DP-SGD (noise multiplier 1) over 8 rounds; client 6 sends large random weights."""
    from fedtrain.simulation import prepare

    key = write_key_file(tmp_path / "model.key", generate_key())
    config, test_set = prepare(
        Config(
            clients=6,
            rounds=8,
            noise_multiplier=1.0,
            target_epsilon=None,
            fraction_evaluate=0.0,
            run_dir=str(tmp_path / "run"),
            key_file=str(key),
            strategy=strategy,
        ).replace(**options)  # fmt: skip
    )
    rng = np.random.default_rng(7)
    grid = InProcessFederation(config, attacker=6, attack=lambda d: rng.normal(0, 10, d.shape).astype(d.dtype))
    return Federation(config, test_set=test_set, on_round=lambda row: None).run(grid)


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("median", {}),
        ("trimmed-mean", {"trim_beta": 0.2}),
        ("krum", {"num_malicious": 1}),
        ("fedavg", {"max_update_norm": 30.0}),
    ],
)
def test_robust_aggregation_or_the_norm_bound_keeps_accuracy_with_one_malicious_client(
    tmp_path, no_accounting, strategy, options
):
    rows = _poisoned_run(tmp_path / strategy, strategy, **options)
    assert rows[-1]["accuracy"] >= 0.65, [round(r["accuracy"], 3) for r in rows]  # 0.80 to 0.88 measured
    if "max_update_norm" in options:  # the bound rejects the attacker every round, with the reason
        assert all("exceeds max_update_norm = 30" in row["failed"]["client-5"] for row in rows)


def test_plain_fedavg_without_the_bound_is_poisoned(tmp_path, no_accounting) -> None:
    """The control: the same attack against plain FedAvg (so the test above can fail)."""
    rows = _poisoned_run(tmp_path, "fedavg")
    assert rows[-1]["accuracy"] < 0.3, [round(r["accuracy"], 3) for r in rows]  # about 0.1: chance
