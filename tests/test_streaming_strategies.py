"""The streaming contract with Flower's strategies: for every strategy in STREAMABLE, aggregating one
reply that holds the streamed weighted mean (weighted by the total number of examples) gives the
same global model and train loss as aggregating every reply; for the robust strategies it does not
(the control), which is why they are left out."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtrain.config import Config
from fedtrain.server.streaming_mean import StreamingMean
from fedtrain.strategies import STRATEGIES, STREAMABLE, make_strategy
from tests.inprocess import flower_task

NODES = 7
SHAPES = {"w": (10, 8), "b": (10,)}


@pytest.fixture(autouse=True)
def task_identity():
    with flower_task():
        yield


class Nodes:
    def get_node_ids(self) -> list[int]:
        return list(range(1, NODES + 1))


def replies_to(messages: list[Message], updates: dict[int, dict], examples: dict[int, int]) -> list[Message]:
    replies = []
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = msg.object_id
        node = msg.metadata.dst_node_id
        arrays = ArrayRecord({k: Array(v) for k, v in updates[node].items()})
        metrics = MetricRecord({"num-examples": examples[node], "train-loss": 0.1 * node})
        replies.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg))
    return replies


def one_reply_with_the_mean(replies: list[Message], global_arrays: dict[str, np.ndarray]) -> list[Message]:
    """What the server loop would build: the streamed mean in the last reply's place."""
    mean, loss = StreamingMean(global_arrays), 0.0
    for reply in replies:
        metrics = reply.content["metrics"]
        mean.add({k: v.numpy() for k, v in reply.content["arrays"].items()}, metrics["num-examples"])
        loss += metrics["num-examples"] * metrics["train-loss"]
    last = replies[-1]
    averaged = MetricRecord({"num-examples": mean.total_weight, "train-loss": loss / mean.total_weight})
    last.content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in mean.result().items()}), "metrics": averaged}
    )
    return [last]


def two_rounds(name: str, stream: bool) -> tuple[dict[str, np.ndarray], float]:
    """Two rounds (FedOpt and FedAvgM keep state across rounds) through the strategy's own methods."""
    config = Config(clients=NODES, strategy=name, num_malicious=1, trim_beta=0.2, proximal_mu=0.1)
    config = config.replace(server_lr=0.5, server_momentum=0.9) if name == "fedavgm" else config
    strategy = make_strategy(config)
    rng = np.random.default_rng(3)
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    examples = {n: 10 * n for n in range(1, NODES + 1)}
    loss = float("nan")
    for server_round in (1, 2):
        messages = list(
            strategy.configure_train(
                server_round, ArrayRecord({k: Array(v) for k, v in weights.items()}), ConfigRecord(), Nodes()
            )
        )
        round_rng = np.random.default_rng(server_round)
        updates = {
            n: {k: (v + round_rng.normal(scale=0.1 * n, size=v.shape)).astype(np.float32) for k, v in weights.items()}
            for n in range(1, NODES + 1)
        }
        replies = replies_to(messages, updates, examples)
        if stream:
            replies = one_reply_with_the_mean(replies, weights)
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        weights = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in arrays.items()}
        loss = float(metrics["train-loss"])
    return weights, loss


@pytest.mark.parametrize("name", sorted(STREAMABLE))
def test_a_streamable_strategy_gives_the_same_model_from_the_streamed_mean(name):
    all_replies, streamed = two_rounds(name, stream=False), two_rounds(name, stream=True)
    for k in SHAPES:
        np.testing.assert_allclose(streamed[0][k], all_replies[0][k], rtol=1e-5, atol=1e-5)
    assert streamed[1] == pytest.approx(all_replies[1])


@pytest.mark.parametrize("name", ["median", "krum", "trimmed-mean"])
def test_control_a_robust_strategy_does_not(name):
    all_replies, streamed = two_rounds(name, stream=False), two_rounds(name, stream=True)
    assert not all(np.allclose(streamed[0][k], all_replies[0][k], rtol=1e-3, atol=1e-3) for k in SHAPES)


def test_every_streamable_name_is_a_strategy():
    assert set(STREAMABLE) <= set(STRATEGIES)
