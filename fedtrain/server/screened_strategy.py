"""fedtrain's screening, as a strategy that wraps Flower's (the way Flower's own DP strategies wrap one).

`aggregate_train` takes a round's replies, a list or a stream as they arrive, and sorts each one
(server/screening.py): refusals and failures are kept with their reason, every client's privacy
record is kept, and only an update with the global model's exact tensors, finite and within
`max_update_norm` goes on. What the wrapped strategy then receives:

- a mean-based strategy (FedAvg, FedProx, the FedOpt family, FedAvgM; no client-level DP): one reply
  holding w_t + the example-weighted mean update, summed as the replies arrive (StreamingMean): the
  server never holds more than one update, however many clients there are;
- any other (median, Krum, Bulyan, trimmed mean, client-level DP's clipping wrappers): every accepted
  reply, as the client's weights w_t + d, which is what Flower's strategies expect.

With fewer than `min_fit_clients` usable updates nothing is aggregated. `aggregate_mean` is the entry
for secure aggregation, where the server only ever sees the unmasked mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.server.node_book import NodeBook
from fedtrain.server.screening import Screened, read, screen_reply
from fedtrain.server.streaming_mean import StreamingMean
from fedtrain.strategies import central_dp
from fedtrain.strategies.registry import STREAMABLE

log = logging.getLogger("fedtrain")


def mean_reply(global_np: dict[str, np.ndarray], mean: dict[str, np.ndarray], weight: float, loss: float) -> Message:
    """One reply holding w_t + the mean update: what a mean-based strategy aggregates to itself,
    or takes its server step (FedAdam, FedAvgM...) on. Tensors nobody trains stay w_t."""
    arrays = ArrayRecord(
        {k: Array(np.asarray(g + mean[k], dtype=g.dtype) if k in mean else g) for k, g in global_np.items()}
    )
    metrics = MetricRecord({protocol.NUM_EXAMPLES: weight, protocol.TRAIN_LOSS: loss, protocol.UNIT_WEIGHT: 1})
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics})
    return Message(content, dst_node_id=0, message_type="train")


class ScreenedStrategy(Strategy):
    """`inner` behind fedtrain's screening. `screened` holds the last round's sorting and `usable`
    its count of updates in the aggregate."""

    def __init__(self, inner: Strategy, config: Config, book: NodeBook, trainable: set[str] | None = None) -> None:
        """`trainable`: the tensors clients train and send (a frozen backbone's are neither); None: all."""
        self.inner, self.config, self.book, self.trainable = inner, config, book, trainable
        self.streams = config.strategy.name in STREAMABLE and not central_dp.uses_central_dp(config)
        self.global_np: dict[str, np.ndarray] = {}
        self.trained_np: dict[str, np.ndarray] = {}
        self.screened = Screened()
        self.usable = self.sampled = 0

    # ---------------------------------------------------------------- Flower's Strategy, delegated

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_np = {k: a.numpy() for k, a in arrays.items()}
        self.trained_np = {k: v for k, v in self.global_np.items() if self.trainable is None or k in self.trainable}
        self.screened, self.usable = Screened(), 0
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sampled = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    # ---------------------------------------------------------------- screening and aggregation

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen `replies` (consumed one at a time) and aggregate the accepted updates."""
        mean, kept = StreamingMean(self.trained_np), []
        for reply in replies:
            update = screen_reply(reply, self.trained_np, self.book.names, self.book.node_of,
                                  self.config.strategy.max_update_norm, self.screened)  # fmt: skip
            if update is not None:
                metrics = reply.content.metric_records[protocol.METRICS]
                if self.streams:
                    mean.add(update, protocol.number(metrics[protocol.NUM_EXAMPLES]))
                else:
                    weights = ArrayRecord(
                        {k: Array(g + update[k] if k in update else g) for k, g in self.global_np.items()}
                    )
                    reply.content = RecordDict({protocol.ARRAYS: weights, protocol.METRICS: metrics})
                    kept.append(reply)
            if not reply.has_error() and self.streams:
                reply.content = RecordDict()  # nothing of the update stays while later replies arrive
        if self.streams:
            self.usable = mean.count
            accepted = [self._mean(mean.result(), mean.total_weight)] if mean.count else []
        else:
            self.usable, accepted = len(kept), kept
        return self._aggregate(server_round, accepted)

    def aggregate_mean(
        self, server_round: int, masked: Iterable[Message], mean: list[np.ndarray] | None, contributors: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation: each client's reply holds its ledger and metrics, never its update; the
        unmasked `mean` of the `contributors`' updates is what the strategy aggregates."""
        for reply in masked:
            if read(reply, self.book.node_of(reply), self.book.names, self.screened) is not None:
                metrics = reply.content.metric_records.get(protocol.METRICS)
                if metrics is not None:
                    self.screened.train_loss.add(metrics, protocol.TRAIN_LOSS)
        self.usable = contributors if mean is not None else 0
        # the masked vector covers every global tensor (zeros where a client trains none): its order is the model's
        accepted = [self._mean(dict(zip(self.global_np, mean, strict=True)), contributors)] if mean is not None else []
        return self._aggregate(server_round, accepted)

    def _mean(self, mean: dict[str, np.ndarray], weight: float) -> Message:
        return mean_reply(self.global_np, mean, weight, self.screened.train_loss.mean)

    def _aggregate(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.usable < self.config.federation.min_fit_clients:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if arrays is None:  # e.g. client-level DP, which releases a round only with every sampled update
            log.warning(
                "round %d: %d usable updates of %d sampled, and the strategy released no model: it stays as it "
                "was, and no client-level privacy is spent.", server_round, self.usable, self.sampled,
            )  # fmt: skip
        return arrays, metrics
