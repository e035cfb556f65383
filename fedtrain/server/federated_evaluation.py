"""Federated evaluation: the global model on the clients' held-out splits, as the clients release it.

Private metrics come with their noise's standard deviation; the mean over clients is weighted by
their (public) held-out counts through Flower's own `aggregate_evaluate`, and its noise follows from
theirs. Every evaluate reply carries the client's ledger, which now holds this release too."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtrain import protocol
from fedtrain.server.node_book import NodeBook
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.server.screening import ClientPrivacy, ReleasedMean, Screened, read
from fedtrain.tasks import Task


@dataclass
class Evaluated:
    """The task's metrics over the clients' held-out splits (from the released means, aggregated
    before the task's report), and the noise's standard deviation where a metric is a released mean."""

    metrics: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


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
    """Ask the nodes the strategy chooses; `privacy` is updated with every ledger that comes back."""
    sent = ConfigRecord({protocol.RUN_ID: run_id})  # every release is on the ledger of this run
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(state), sent, grid))
    if not messages:
        return Evaluated()
    replies = list(grid.send_and_receive(messages, timeout=strategy.config.federation.round_timeout))
    book.sent(messages)
    screened, usable = Screened(), []
    keys = [protocol.eval_key(name) for name in task.values]
    released = {name: ReleasedMean() for name in task.values}
    for reply in replies:
        parsed = read(reply, book.node_of(reply), book.names, screened)
        if parsed is None or not all(key in parsed.metrics for key in keys):
            continue
        metrics = parsed.metrics
        if not protocol.number(metrics.get(protocol.NUM_EXAMPLES, 0)) > 0:
            continue
        for name, key in zip(task.values, keys, strict=True):
            released[name].add(metrics, key)
        reply.content = RecordDict(
            {protocol.METRICS: MetricRecord({k: metrics[k] for k in (protocol.NUM_EXAMPLES, *keys)})}
        )
        usable.append(reply)
    privacy.update(screened.privacy)
    if not usable:
        return Evaluated()
    aggregated = strategy.aggregate_evaluate(server_round, usable)  # Flower's own mean, weighted by count
    if aggregated is None:
        return Evaluated()
    means = {name: protocol.number(aggregated[key]) for name, key in zip(task.values, keys, strict=True)}
    std = {name: released[name].std for name in task.values if released[name].std > 0}
    return Evaluated(task.report(means), std)
