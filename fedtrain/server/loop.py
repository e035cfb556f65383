"""The server's round loop: Flower's strategy decides whom to ask and how to aggregate; this loop
adds what fedtrain promises around it, every round:

    configure_train -> send/receive -> screen replies (refused / failed / accepted, ledgers)
    -> strategy.aggregate_train(client weights) -> federated + central evaluation
    -> metrics history, privacy report, plot -> encrypted atomic checkpoint -> progress callback

It mirrors `flwr.serverapp.strategy.Strategy.start`, which offers no per-round hook.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

import fedtrain
from fedtrain import protocol
from fedtrain.config import Config
from fedtrain.data import Dataset
from fedtrain.errors import FedtrainError
from fedtrain.evaluation import evaluate
from fedtrain.fileio import atomic_write_text
from fedtrain.models import build_model
from fedtrain.security.keys import load_model_key
from fedtrain.security.run_integrity import RunIntegrity
from fedtrain.server import checkpoint, history
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, RUN_FILE, save_model
from fedtrain.server.payload_sealer import PayloadSealer
from fedtrain.server.reply_stream import stream_replies
from fedtrain.server.screening import (
    ClientPrivacy,
    ReleasedMean,
    Screened,
    read,
    screen,
    screen_masked,
    screen_reply,
)
from fedtrain.server.secure_aggregation import SecureAggregator
from fedtrain.server.streaming_mean import StreamingMean
from fedtrain.strategies import central_dp, make_strategy
from fedtrain.strategies.registry import STREAMABLE

log = logging.getLogger("fedtrain")
RoundCallback = Callable[[dict[str, Any]], None]
PLOT_EVERY_SECONDS = 60.0  # training.png is redrawn at most this often, and after the last round


def _mean_metric(metrics: Any, key: str) -> float:
    return float(metrics[key]) if metrics is not None and key in metrics else float("nan")


def _mean_reply(global_np: dict[str, np.ndarray], mean: dict[str, np.ndarray], weight: float, loss: float) -> Message:
    """One reply holding w_t + the mean update: what a mean-based strategy aggregates to itself,
    or takes its server step (FedAdam, FedAvgM...) on."""
    arrays = ArrayRecord({k: Array(np.asarray(g + mean[k], dtype=g.dtype)) for k, g in global_np.items()})
    metrics = MetricRecord({protocol.NUM_EXAMPLES: weight, protocol.TRAIN_LOSS: loss, protocol.UNIT_WEIGHT: 1})
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), dst_node_id=0,
                   message_type="train")  # fmt: skip


class Federation:
    """One fedtrain run on the server side: owns the global model and the run directory."""

    def __init__(
        self,
        config: Config,
        *,
        test_set: Dataset | None = None,
        on_round: RoundCallback | None = None,
        sealer: PayloadSealer | None = None,
        resume: bool = False,
    ) -> None:
        if not config.run_dir:
            raise FedtrainError("the server needs a run directory (run_dir) to keep the model and metrics.")
        num_classes = config.num_classes or (len(config.labels) if config.labels else None)
        if not config.input_shape or not num_classes:
            raise FedtrainError("the server needs input_shape and num_classes (or labels) in the config.")
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.test_set = test_set
        self.sealer = sealer
        self.on_round = on_round or self._log_round
        self.model_key = load_model_key(config.key_file)
        self.resume = resume
        self.run_id = checkpoint.resumable_run_id(self.run_dir, self.model_key) if resume else uuid.uuid4().hex
        self.integrity = RunIntegrity(self.run_dir, self.model_key.key, self.run_id)  # metrics, privacy report, plot
        self.model = build_model(config.model, config.input_shape, num_classes, hidden=config.hidden, seed=config.seed)
        self.device = torch.device("cpu")  # the server aggregates and evaluates small models on CPU
        self.rows: list[dict[str, Any]] = []
        self.privacy: dict[str, ClientPrivacy] = {}
        self.node_names: dict[int, str] = {}
        self._plotted = time.monotonic()
        self._recipients: dict[str, int] = {}  # the last exchange: message id -> the node it went to
        self.secure = SecureAggregator(config) if config.secure_aggregation else None
        # A weighted mean (then maybe a server step) is summed as replies arrive: the server's memory
        # does not grow with the number of clients. Client-level DP's wrapper clips each reply itself.
        self.streams = self.secure is None and config.strategy in STREAMABLE and not central_dp.uses_central_dp(config)
        self.released: list[int] = []  # rounds whose model client-level DP released (when it is on)
        # Client-level DP sets its noise for exactly `clients` updates per round: wait for all of them.
        self.clients_needed = config.clients if central_dp.uses_central_dp(config) else config.clients_to_wait_for

    # ------------------------------------------------------------------ files

    def _write_run_info(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", self.config.to_toml())
        info = {
            "run_id": self.run_id,
            "key_id": self.model_key.key_id,
            "fedtrain_version": fedtrain.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(info, indent=2) + "\n")

    def _save_model(self, state: dict[str, torch.Tensor]) -> None:
        meta = {"round": self.config.rounds, "run_id": self.run_id}
        save_model(self.run_dir / MODEL_FILE, state, self.model_key.key, self.run_id, "model", meta)

    # ------------------------------------------------------------------ loop

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        strategy = make_strategy(self.config)
        state = OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items())
        first = 1
        if self.resume:
            resumed = checkpoint.load(self.run_dir, self.model_key.key, self.run_id, self.config, strategy)
            state, self.rows, self.privacy, self.released = (
                resumed.model,
                resumed.rows,
                resumed.privacy,
                resumed.released,
            )
            first = resumed.server_round + 1
            log.info("resuming %s after round %d of %d", self.run_dir, resumed.server_round, self.config.rounds)
        else:
            random.seed(self.config.seed)  # Flower samples each round's clients from Python's generator
            self._write_run_info()
        for server_round in range(first, self.config.rounds + 1):
            state = self._round(grid, strategy, server_round, state)
        self._save_model(state)
        return self.rows

    def _round(self, grid: Grid, strategy: Any, server_round: int, state: OrderedDict) -> OrderedDict:
        started = time.monotonic()
        self._wait_for_clients(grid, server_round)
        global_np = {k: v.numpy() for k, v in state.items()}
        messages = self._configure_train(grid, strategy, server_round, state)
        secure: dict[str, Any] | None = None
        if self.secure is not None:
            screened, secure = self._secure_exchange(grid, messages, server_round, global_np)
            usable = secure["contributors"]
        elif self.streams:
            screened, usable = self._streamed_exchange(grid, messages, server_round, global_np)
        else:
            replies, unopened = self._exchange(grid, messages, server_round)
            screened = screen(replies, global_np, self.node_names, self._node_of, self.config.max_update_norm)
            screened.failed.update({self._name(node): why for node, why in unopened.items()})
            self._note_missing(messages, [*(self._node_of(r) for r in replies), *unopened], screened.failed)
            usable = len(screened.accepted)
        self.privacy.update(screened.privacy)
        enough = usable >= self.config.min_fit_clients
        if enough:
            arrays, _ = strategy.aggregate_train(server_round, screened.accepted)
            if arrays is not None:
                state = OrderedDict(
                    (k, torch.from_numpy(np.asarray(a.numpy(), dtype=global_np[k].dtype))) for k, a in arrays.items()
                )
                self.released.append(server_round)
            elif central_dp.uses_central_dp(self.config):
                log.warning(
                    "round %d: %d of %d updates usable; client-level DP releases a round only with all of "
                    "them, so the model stays as it was and no client-level privacy is spent.",
                    server_round,
                    len(screened.accepted),
                    len(messages),
                )
        for name, reason in {**screened.failed, **screened.refused}.items():
            log.warning("round %d: %s: %s", server_round, name, reason)

        federated = self._federated_evaluation(grid, strategy, server_round, state)
        test_loss, test_acc = self._central_evaluation(state)
        central = self.test_set is not None
        row = {
            "round": server_round,
            "accuracy": test_acc if central else federated["accuracy"],
            "loss": test_loss if central else federated["loss"],
            "federated_accuracy": federated["accuracy"],
            "federated_accuracy_std": federated["accuracy_std"],
            "federated_loss": federated["loss"],
            "federated_loss_std": federated["loss_std"],
            "train_loss": screened.train_loss.mean,
            "train_loss_std": screened.train_loss.std,
            "clients_ok": usable,
            "clients_refused": len(screened.refused),
            "clients_failed": len(screened.failed),
            "epsilon_max": max((p.epsilon for p in self.privacy.values()), default=0.0),
            "epsilon": {cid: p.epsilon for cid, p in sorted(self.privacy.items())},
            "client_epsilon": central_dp.spent_epsilon(strategy),
            "client_clipping_norm": getattr(strategy, "clipping_norm", None),
            "refused": dict(screened.refused),
            "failed": dict(screened.failed),
            "seconds": round(time.monotonic() - started, 3),
        }
        if secure is not None:
            row["secure_aggregation"] = secure
        self.rows.append(row)
        # Refusals of a spent budget are policy working as meant: the run goes on with who is left. Failures,
        # and clients refusing the run itself, stop it when too few usable updates remain.
        lost = bool(screened.failed or screened.refused_by_policy)
        stops = lost and not enough and not (set(screened.refused) - screened.refused_by_policy)
        history.write_metrics(self.run_dir, self.rows, self.integrity)
        history.write_privacy_report(
            self.run_dir, self.privacy, central_dp.report(strategy, self.config, self.released), self.integrity
        )
        if stops or server_round == self.config.rounds or time.monotonic() - self._plotted >= PLOT_EVERY_SECONDS:
            history.write_plot(self.run_dir, self.rows, self.integrity)  # 0.2 s or more of a round: not every round
            self._plotted = time.monotonic()
        checkpoint.save(self.run_dir, self.model_key.key, self.run_id, server_round, state, strategy, self.config,
                        self.rows, self.privacy, self.released)  # fmt: skip
        self.on_round(row)
        if stops:
            lost_clients = {**screened.failed, **{n: screened.refused[n] for n in screened.refused_by_policy}}
            name, reason = next(iter(lost_clients.items()))
            raise FedtrainError(
                f"round {server_round}: {usable} usable updates, fewer than min_fit_clients = "
                f"{self.config.min_fit_clients} ({len(screened.failed)} failed, {len(screened.refused_by_policy)} "
                f"refused the run, e.g. {name}: {reason}); the run stops, its last good model is in "
                f"{self.run_dir / CHECKPOINT_FILE}."
            )
        return state

    def _wait_for_clients(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.config.round_timeout
        needed = self.clients_needed
        while (online := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() > deadline:
                why = (
                    "clients (client-level DP needs all)"
                    if central_dp.uses_central_dp(self.config)
                    else "the clients a round waits for (min_fit_clients, min_available_clients)"
                )
                raise FedtrainError(
                    f"round {server_round}: {online} clients online, fewer than {why} = {needed}, for "
                    f"round_timeout ({self.config.round_timeout:.0f} s); the run stops, its last good model is in "
                    f"{self.run_dir / CHECKPOINT_FILE}."
                )
            time.sleep(1)

    def _configure_train(self, grid: Grid, strategy: Any, server_round: int, state: OrderedDict) -> list[Message]:
        try:
            # fedtrain's run id: clients key their stored ledgers by it, and it survives a resume
            sent = ConfigRecord({protocol.RUN_ID: self.run_id})
            return list(strategy.configure_train(server_round, ArrayRecord(state), sent, grid))
        except PrivacyBudgetExhausted:
            spent = central_dp.spent_epsilon(strategy)
            raise FedtrainError(
                f"round {server_round}: another release would take client-level epsilon past max_client_epsilon = "
                f"{self.config.max_client_epsilon:g} (spent {spent:.3f}); the run stops, its last model is in "
                f"{self.run_dir / CHECKPOINT_FILE}."
            ) from None
        except ValueError as exc:  # Flower's DP wrapper: the sample is not the size the noise was set for
            raise FedtrainError(f"round {server_round}: client-level DP cannot run this round ({exc}).") from None

    def _exchange(self, grid: Grid, messages: list[Message], server_round: int) -> tuple[list[Message], dict[int, str]]:
        """Send and receive, sealing and opening payloads when end-to-end encryption is on."""
        if self.sealer is not None:
            messages = self.sealer.seal(messages, server_round)
        replies = list(grid.send_and_receive(messages, timeout=self.config.round_timeout))
        self._recipients = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        if self.sealer is None:
            return replies, {}
        return self.sealer.open(replies, server_round)

    def _secure_exchange(
        self, grid: Grid, messages: list[Message], server_round: int, global_np: dict[str, np.ndarray]
    ) -> tuple[Screened, dict[str, Any]]:
        """One round through SecAgg+: the screened ledgers, and at most one accepted reply holding
        w_t + the mean update (what the strategy aggregates)."""
        exchange = lambda batch: self._exchange(grid, batch, server_round)  # noqa: E731 - seals each stage
        outcome = self.secure.run(exchange, messages, server_round, self._node_of)
        screened = screen_masked(outcome.collected, self.node_names, self._node_of)
        screened.failed.update({self._name(node): why for node, why in outcome.failed.items()})
        metrics = [r.content.metric_records[protocol.METRICS] for r in screened.accepted
                   if protocol.METRICS in r.content.metric_records]  # fmt: skip
        summary = {
            "contributors": outcome.contributors,
            "updates_scaled": sum(int(m.get(protocol.SECAGG_SCALED, 0)) for m in metrics),
            "values_clipped": sum(int(m.get(protocol.SECAGG_CLIPPED, 0)) for m in metrics),
        }
        if summary["values_clipped"]:
            log.warning(
                "round %d: %d update values fell outside SecAgg+'s range [-%g, %g] and were clipped.",
                server_round,
                summary["values_clipped"],
                self.config.secagg_update_bound,
                self.config.secagg_update_bound,
            )
        screened.accepted = []
        if outcome.mean is not None:
            mean = dict(zip(global_np, outcome.mean, strict=True))
            screened.accepted = [_mean_reply(global_np, mean, outcome.contributors, screened.train_loss.mean)]
        return screened, summary

    def _streamed_exchange(
        self, grid: Grid, messages: list[Message], server_round: int, global_np: dict[str, np.ndarray]
    ) -> tuple[Screened, int]:
        """Screen and sum each reply as it arrives, keeping no update: (the screened round, with at
        most one accepted reply holding w_t + the weighted mean update; the updates summed)."""
        if self.sealer is not None:
            messages = self.sealer.seal(messages, server_round)
        replies = stream_replies(grid, messages, timeout=self.config.round_timeout)
        self._recipients = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        screened, mean, answered = Screened(), StreamingMean(global_np), []
        for reply in replies:
            answered.append(self._node_of(reply))
            if self.sealer is not None:
                opened, unopened = self.sealer.open([reply], server_round)
                screened.failed.update({self._name(node): why for node, why in unopened.items()})
                if not opened:
                    continue
            update = screen_reply(reply, global_np, self.node_names, self._node_of, self.config.max_update_norm,
                                  screened)  # fmt: skip
            if update is not None:
                mean.add(update, float(reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]))
            if not reply.has_error():
                reply.content = RecordDict()  # nothing of the update stays while later replies arrive
        self._note_missing(messages, answered, screened.failed)
        if mean.count:
            screened.accepted = [_mean_reply(global_np, mean.result(), mean.total_weight, screened.train_loss.mean)]
        return screened, mean.count

    def _name(self, node: int) -> str:
        return self.node_names.get(node, f"node-{node}")

    def _node_of(self, reply: Message) -> int:
        """The node a reply answers for: its sender, or for the SuperLink's own error reply about a
        node that stopped sending heartbeats, the node the message was addressed to."""
        return self._recipients.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _note_missing(self, messages: list[Message], answered: list[int], failed: dict[str, str]) -> None:
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                failed[self.node_names.get(node, f"node-{node}")] = "no reply within round_timeout"

    def _federated_evaluation(self, grid: Grid, strategy: Any, server_round: int, state: OrderedDict) -> dict:
        """Loss and accuracy on the clients' held-out splits, as they released them (private metrics
        come with their noise's standard deviation); every client's ledger is updated, since each
        release is on it."""
        nan = float("nan")
        out = {"loss": nan, "loss_std": nan, "accuracy": nan, "accuracy_std": nan}
        sent = ConfigRecord({protocol.RUN_ID: self.run_id})  # every release is on the ledger of this run
        messages = list(strategy.configure_evaluate(server_round, ArrayRecord(state), sent, grid))
        if not messages:
            return out
        screened, usable = Screened(), []
        loss, accuracy = ReleasedMean(), ReleasedMean()
        for reply in self._exchange(grid, messages, server_round)[0]:
            parsed = read(reply, self._node_of(reply), self.node_names, screened)
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
        self.privacy.update(screened.privacy)
        if usable:
            metrics = strategy.aggregate_evaluate(server_round, usable)  # Flower's own (weighted) mean
            out["loss"] = _mean_metric(metrics, protocol.EVAL_LOSS)
            out["accuracy"] = _mean_metric(metrics, protocol.EVAL_ACCURACY)
            out["loss_std"], out["accuracy_std"] = loss.std, accuracy.std
        return out

    def _central_evaluation(self, state: OrderedDict) -> tuple[float, float]:
        if self.test_set is None:
            return float("nan"), float("nan")
        self.model.load_state_dict(state)
        return evaluate(self.model, self.test_set, self.device)

    def _log_round(self, row: dict[str, Any]) -> None:
        log.info(
            "round %d/%d: accuracy %.4f, max epsilon %.3f, clients ok %d, refused %d, failed %d",
            row["round"],
            self.config.rounds,
            row["accuracy"],
            row["epsilon_max"],
            row["clients_ok"],
            row["clients_refused"],
            row["clients_failed"],
        )
