"""Federated evaluation: the global model on the clients' held-out splits, as the clients release it.

Private metrics come with their noise's standard deviation; the mean over clients is weighted by
their (public) held-out counts through Flower's own `aggregate_evaluate`, and its noise follows from
theirs. Every reply carries the client's ledger, which now holds this release too.

One task per round: when every available client both trains and evaluates (`rides`), the
evaluation of round t's model rides on round t+1's train messages (protocol.EVALUATE_FIRST: each
client evaluates the model it receives, then trains on it, and sends one reply), so a round costs
each client one task instead of two. Only the last round's model gets evaluate messages of its own.
What a client spends is the same either way: one release per evaluation, checked against the same
budget and recorded in the same order (clients/handlers.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.server.node_book import NodeBook
from fedtrain.server.reply_stream import collect_replies
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.server.screening import ClientPrivacy, ReleasedMean, Screened, read
from fedtrain.tasks import Task


@dataclass
class Evaluated:
    """The task's metrics over the clients' held-out splits (from the released means, aggregated
    before the task's report), and the noise's standard deviation where a metric is a released mean."""

    metrics: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


def rides(config: Config) -> bool:
    """Whether evaluation rides on the next round's train messages: only where the strategy would ask
    the very clients it trains (every available one for both), so no client is asked otherwise."""
    return config.federation.fraction_evaluate == 1.0 and config.federation.fraction_train == 1.0


def federated_evaluation(
    grid: Grid,
    strategy: ScreenedStrategy,
    server_round: int,
    state: OrderedDict[str, torch.Tensor],
    run_id: str,
    book: NodeBook,
    privacy: dict[str, ClientPrivacy],
    task: Task,
) -> Evaluated:
    """Evaluate messages to the nodes the strategy chooses; `privacy` is updated with every ledger that
    comes back."""
    sent = ConfigRecord({protocol.RUN_ID: run_id})  # every release is on the ledger of this run
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(state), sent, grid))
    if not messages:
        return Evaluated()
    replies = collect_replies(grid, messages, timeout=strategy.config.federation.round_timeout)
    book.sent(messages)
    screened, released = Screened(), []
    for reply in replies:
        parsed = read(reply, book.node_of(reply), book.names, screened)
        if parsed is not None:
            released.append(parsed.metrics)
    privacy.update(screened.privacy)
    return aggregate(strategy, server_round, released, task)


def aggregate(strategy: ScreenedStrategy, server_round: int, released: list[protocol.Metrics], task: Task) -> Evaluated:
    """The clients' released evaluations (each as an evaluate reply's metrics), weighted by their
    held-out counts with the strategy's `aggregate_evaluate`."""
    keys = [protocol.eval_key(name) for name in task.values]
    means = {name: ReleasedMean() for name in task.values}
    usable = []
    for metrics in released:
        if not all(key in metrics for key in keys) or not protocol.number(metrics.get(protocol.NUM_EXAMPLES, 0)) > 0:
            continue
        for name, key in zip(task.values, keys, strict=True):
            means[name].add(metrics, key)
        record = MetricRecord({k: metrics[k] for k in (protocol.NUM_EXAMPLES, *keys)})
        usable.append(Message(RecordDict({protocol.METRICS: record}), dst_node_id=0, message_type="evaluate"))
    if not usable:
        return Evaluated()
    aggregated = strategy.aggregate_evaluate(server_round, usable)  # Flower's own mean, weighted by count
    if aggregated is None:
        return Evaluated()
    result = {name: protocol.number(aggregated[key]) for name, key in zip(task.values, keys, strict=True)}
    std = {name: means[name].std for name in task.values if means[name].std > 0}
    return Evaluated(task.report(result), std)
