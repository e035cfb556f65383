"""Server side of secure aggregation: Flower's SecAgg+ (Bell et al. 2020), so the server learns only
the sum of the clients' updates.

Flower ships SecAgg+ only as a legacy workflow (`flwr.server.workflow.SecAggPlusWorkflow`), whose
four stages (setup, share keys, collect masked vectors, unmask) drive a legacy Strategy through a
LegacyContext. fedtrain runs those four stage methods unchanged and hands them, instead:

- the nodes and train messages fedtrain's own strategy chose (its `configure_train`), in place of
  a legacy strategy's FitIns;
- a grid that passes every stage's messages through fedtrain's exchange (end-to-end sealing and
  opening when payload encryption is on) and notes which node failed in which stage and why;
- a legacy `aggregate_fit` that only takes the unmasked aggregate.

Clients take part with weight 1 (or 0 when they refuse the round), so the aggregate is the uniform
mean of the contributing updates; dropouts up to the reconstruction threshold are unmasked from the
survivors' shares. The quantisation range is [-R, R] with R = secagg_update_bound, the L2 bound
every client scales its update to (clients/secure_aggregation.py), so nothing is clipped unseen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtrain import protocol
from fedtrain._flower import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
    FitIns,
    Parameters,
    SecAggPlusWorkflow,
    WorkflowKey,
    WorkflowState,
    bytes_to_ndarray,
    parameters_to_ndarrays,
)
from fedtrain.config import Config
from fedtrain.server.screening import error_reason

log = logging.getLogger("fedtrain")
Exchange = Callable[[list[Message]], list[Message]]  # one stage's messages out, their replies back


@dataclass
class SecureOutcome:
    """One securely aggregated round, as the server sees it."""

    mean: list[np.ndarray] | None = None  # the mean update, in the order of the global arrays
    contributors: int = 0  # clients whose update is in the mean
    collected: list[Message] = field(default_factory=list)  # masked-vector replies: metrics, ledger
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it is not in the round
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)  # what the server received


class _StageGrid:
    """The grid the workflow's stages talk to: fedtrain's exchange, with failures noted per node."""

    def __init__(self, exchange: Exchange, node_of: Callable[[Message], int]) -> None:
        self.exchange, self.node_of = exchange, node_of
        self.failed: dict[int, str] = {}
        self.collected: list[Message] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        replies = self.exchange(messages)
        answered = {self.node_of(reply) for reply in replies}
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.failed[msg.metadata.dst_node_id] = f"no reply in SecAgg+ stage {stage!r} within round_timeout"
        for reply in replies:
            if reply.has_error():
                self.failed[self.node_of(reply)] = f"SecAgg+ stage {stage!r}: {error_reason(reply)}"
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.collected = [reply for reply in replies if not reply.has_error()]
        return replies


class _LegacyStandIn:
    """The legacy strategy and client manager the stages call: it offers fedtrain's chosen nodes and
    keeps the unmasked aggregate instead of aggregating."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.aggregate: list[np.ndarray] | None = None
        self.weight = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        empty = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})
        return [(SimpleNamespace(node_id=node), empty) for node in self.nodes]

    def num_available(self) -> int:
        return len(self.nodes)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        self.weight = int(sum(fitres.num_examples for _, fitres in results))
        if results and self.weight > 0:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class SecureAggregator:
    def __init__(self, config: Config) -> None:
        self.workflow = SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled client holds a share of every other's secrets
            reconstruction_threshold=config.federation.secagg_threshold,
            max_weight=1.0,
            clipping_range=config.federation.secagg_update_bound,
            timeout=config.federation.round_timeout,
        )

    def run(
        self, exchange: Exchange, messages: list[Message], server_round: int, node_of: Callable[[Message], int]
    ) -> SecureOutcome:
        """The four SecAgg+ stages for this round's train `messages`; their content is what each
        client trains on, sent (masking configs added) in the stage that collects masked vectors."""
        grid: Any = _StageGrid(exchange, node_of)  # what the workflow's stages use of a Grid
        stand_in = _LegacyStandIn([msg.metadata.dst_node_id for msg in messages])
        context: Any = SimpleNamespace(  # what the stages use of a LegacyContext
            state=RecordDict(
                {
                    MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                    MAIN_PARAMS_RECORD: ArrayRecord(),
                }
            ),
            strategy=stand_in,
            client_manager=stand_in,
        )
        state = WorkflowState()
        completed = self.workflow.setup_stage(grid, context, state)
        # One RecordDict per node: Flower's strategies give all their messages the same content
        # object, and the masking stage adds each node's own shares to it.
        state.nid_to_fitins = {msg.metadata.dst_node_id: RecordDict(dict(msg.content.items())) for msg in messages}
        for stage in (self.workflow.share_keys_stage, self.workflow.collect_masked_vectors_stage):
            completed = completed and stage(grid, context, state)
        outcome = SecureOutcome(collected=grid.collected, failed=grid.failed)
        for reply in grid.collected:
            masked = protocol.values(reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
            outcome.masked[node_of(reply)] = [bytes_to_ndarray(b) for b in masked]
        with np.errstate(divide="ignore", invalid="ignore"):
            completed = completed and self.workflow.unmask_stage(grid, context, state)
        if not completed:
            log.warning("round %d: SecAgg+ could not finish (too few clients answered); no update.", server_round)
            return outcome
        outcome.failed = grid.failed
        if stand_in.aggregate is not None and all(np.isfinite(a).all() for a in stand_in.aggregate):
            outcome.mean, outcome.contributors = stand_in.aggregate, stand_in.weight
        return outcome
