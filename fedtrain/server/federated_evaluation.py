"""Federated evaluation: the global model on the clients' held-out splits, as the clients release it.

Private metrics come with their noise's standard deviation; the mean over clients is weighted by
their (public) held-out counts through Flower's own `aggregate_evaluate`, and its noise follows from
theirs. Every evaluate reply carries the client's ledger, which now holds this release too."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtrain import protocol
from fedtrain.server.node_book import NodeBook
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.server.screening import ClientPrivacy, ReleasedMean, Screened, read

NAN = float("nan")


@dataclass
class Evaluated:
    loss: float = NAN
    loss_std: float = NAN
    accuracy: float = NAN
    accuracy_std: float = NAN


def federated_evaluation(
    grid: Grid,
    strategy: ScreenedStrategy,
    server_round: int,
    state: OrderedDict[str, torch.Tensor],
    run_id: str,
    book: NodeBook,
    privacy: dict[str, ClientPrivacy],
) -> Evaluated:
    """Ask the nodes the strategy chooses; `privacy` is updated with every ledger that comes back."""
    sent = ConfigRecord({protocol.RUN_ID: run_id})  # every release is on the ledger of this run
    messages = list(strategy.configure_evaluate(server_round, ArrayRecord(state), sent, grid))
    if not messages:
        return Evaluated()
    replies = list(grid.send_and_receive(messages, timeout=strategy.config.federation.round_timeout))
    book.sent(messages)
    screened, usable = Screened(), []
    loss, accuracy = ReleasedMean(), ReleasedMean()
    for reply in replies:
        parsed = read(reply, book.node_of(reply), book.names, screened)
        if parsed is None or protocol.EVAL_ACCURACY not in parsed.metrics:
            continue
        metrics = parsed.metrics
        if not float(metrics.get(protocol.NUM_EXAMPLES, 0)) > 0:
            continue
        loss.add(metrics, protocol.EVAL_LOSS)
        accuracy.add(metrics, protocol.EVAL_ACCURACY)
        keys = (protocol.NUM_EXAMPLES, protocol.EVAL_LOSS, protocol.EVAL_ACCURACY)
        reply.content = RecordDict({protocol.METRICS: MetricRecord({k: metrics[k] for k in keys})})
        usable.append(reply)
    privacy.update(screened.privacy)
    if not usable:
        return Evaluated()
    aggregated = strategy.aggregate_evaluate(server_round, usable)  # Flower's own (weighted) mean
    return Evaluated(
        _metric(aggregated, protocol.EVAL_LOSS), loss.std, _metric(aggregated, protocol.EVAL_ACCURACY), accuracy.std
    )


def _metric(metrics: MetricRecord | None, key: str) -> float:
    return protocol.number(metrics[key]) if metrics is not None and key in metrics else NAN
