"""The server's round loop: Flower's strategy decides whom to ask and how to aggregate; this loop
adds what fedtrain promises around it, every round, by composition:

    grid           the engine's Grid, wrapped per round by SealedGrid when payloads are encrypted
    exchange       how train messages go out and replies come in (plain, streamed, secure: exchanges/)
    strategy       Flower's strategy behind ScreenedStrategy (screening, the streamed mean)
    evaluation     federated (clients' held-out splits, released privately) and central (simulation)
    observers      metrics history, privacy report, plot, encrypted checkpoint, progress (observers/)

It mirrors `flwr.serverapp.strategy.Strategy.start`, which offers no per-round hook.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

import fedtrain
from fedtrain import protocol
from fedtrain.components import Components, model_for, outputs_for, task_for
from fedtrain.config import Config
from fedtrain.data import Dataset
from fedtrain.errors import FedtrainError
from fedtrain.evaluation import evaluate_task
from fedtrain.fileio import atomic_write_text
from fedtrain.models import build_model
from fedtrain.security.keys import load_model_key
from fedtrain.security.run_integrity import RunIntegrity
from fedtrain.server import checkpoint
from fedtrain.server import federated_evaluation as evaluation
from fedtrain.server.exchanges import exchange_for
from fedtrain.server.model_files import CHECKPOINT_FILE, MODEL_FILE, RUN_FILE, save_model
from fedtrain.server.node_book import NodeBook
from fedtrain.server.observers import OBSERVERS, RoundRecord
from fedtrain.server.payload_sealer import PayloadSealer
from fedtrain.server.quantized_export import CENTRAL_SPLIT
from fedtrain.server.screened_strategy import ScreenedStrategy
from fedtrain.server.screening import ClientPrivacy
from fedtrain.server.sealed_grid import SealedGrid
from fedtrain.strategies import central_dp, make_strategy

log = logging.getLogger("fedtrain")
RoundCallback = Callable[[dict[str, Any]], None]


def _versions() -> dict[str, str]:
    """The versions of Python and of the packages that decide what a run computes."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("fedtrain", "flwr", "opacus", "torch", "numpy", "cryptography"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


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
        components: Components | None = None,
    ) -> None:
        if not config.deployment.run_dir:
            raise FedtrainError("the server needs a run directory (run_dir) to keep the model and metrics.")
        self.task = task_for(config, components)
        if not config.data.input_shape:
            raise FedtrainError("the server needs input_shape (and the classes, or num_outputs) in the config.")
        outputs = outputs_for(config, self.task)
        self.config = config
        self.run_dir = Path(config.deployment.run_dir)
        self.test_set = test_set
        self.sealer = sealer
        self.on_round = on_round or self._log_round
        self.model_key = load_model_key(config.deployment.key_file)
        self.resume = resume
        self.run_id = checkpoint.resumable_run_id(self.run_dir, self.model_key) if resume else uuid.uuid4().hex
        self.integrity = RunIntegrity(self.run_dir, self.model_key.key, self.run_id)  # metrics, privacy report, plot
        # what the run is when it is not an ordinary one (fedtrain audit's canaries, a positive control):
        # in run.json and every privacy.json from the first round, so no file of it passes for an ordinary run
        probe = components.probe if components is not None else None
        self.marks: dict[str, Any] = probe.report_marks() if probe is not None else {}
        self.model = build_model(
            model_for(config, components),
            config.data.input_shape,
            outputs,
            hidden=config.training.hidden,
            seed=config.federation.seed,
        )
        # what clients train and send; a frozen backbone stays as the model was made, and is saved whole
        self.trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self.device = torch.device("cpu")  # the server aggregates and evaluates small models on CPU
        self.rows: list[dict[str, Any]] = []
        self.privacy: dict[str, ClientPrivacy] = {}
        self.book = NodeBook()
        self.exchange = exchange_for(config, self.book)
        self.rides = evaluation.rides(config)  # federated evaluation rides on the next round's train messages
        self.observers = [observer(self) for observer in OBSERVERS]
        self.released: list[int] = []  # rounds that released a new model (client-level DP may skip one)
        # Client-level DP sets its noise for exactly `clients` updates per round: wait for all of them.
        client_level = central_dp.uses_central_dp(config)
        self.clients_needed = config.federation.clients if client_level else config.clients_to_wait_for
        self.waiting_for = (
            "clients (client-level DP needs all)"
            if client_level
            else "the clients a round waits for (min_fit_clients, min_available_clients)"
        )

    # ------------------------------------------------------------------ files

    def _write_run_info(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.toml", self.config.to_toml())
        info = {
            "run_id": self.run_id,
            "key_id": self.model_key.key_id,
            "fedtrain_version": fedtrain.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),  # what trained and accounted this run (the report shows it)
            CENTRAL_SPLIT: self.test_set is not None,  # `fedtrain export --quantize` evaluates on it
            **self.marks,
        }
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(info, indent=2) + "\n")

    def _save_model(self, state: dict[str, torch.Tensor]) -> None:
        meta = {"round": self.config.federation.rounds, "run_id": self.run_id}
        save_model(self.run_dir / MODEL_FILE, state, self.model_key.key, self.run_id, "model", meta)

    # ------------------------------------------------------------------ loop

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        try:
            self._run(grid)
        except BaseException:
            self._after_run(completed=False)
            raise
        self._after_run(completed=True)
        return self.rows

    def _run(self, grid: Grid) -> None:
        inner = make_strategy(self.config)
        strategy = ScreenedStrategy(inner, self.config, self.book, self.trainable)
        state = OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items())
        first = 1
        if self.resume:
            resumed = checkpoint.load(self.run_dir, self.model_key.key, self.run_id, self.config, inner)
            state, self.rows, self.privacy, self.released = (
                resumed.model,
                resumed.rows,
                resumed.privacy,
                resumed.released,
            )
            first = resumed.server_round + 1
            log.info(
                "resuming %s after round %d of %d", self.run_dir, resumed.server_round, self.config.federation.rounds
            )
        else:
            random.seed(self.config.federation.seed)  # Flower samples each round's clients from Python's generator
            self._write_run_info()
        for server_round in range(first, self.config.federation.rounds + 1):
            state = self._round(grid, strategy, server_round, state)
        self._save_model(state)

    def _after_run(self, completed: bool) -> None:
        for observer in self.observers:
            observer.after_run(completed)

    def _round(self, grid: Grid, strategy: ScreenedStrategy, server_round: int, state: OrderedDict) -> OrderedDict:
        started = time.monotonic()
        self._wait_for_clients(grid, server_round)
        if self.sealer is not None:
            grid = SealedGrid(grid, self.sealer, server_round)
        messages = self._configure_train(grid, strategy, server_round, state)
        trained = self.exchange.train(grid, strategy, messages, server_round)
        screened = strategy.screened
        self.privacy.update(screened.privacy)
        if trained.arrays is not None:
            state = OrderedDict(
                (k, torch.from_numpy(np.asarray(a.numpy(), dtype=state[k].numpy().dtype)))
                for k, a in trained.arrays.items()
            )
            self.released.append(server_round)
        for name, reason in {**screened.failed, **screened.refused}.items():
            log.warning("round %d: %s: %s", server_round, name, reason)
        if self.rides and self.rows and self.rows[-1]["round"] == server_round - 1:
            # this round's train replies evaluated the previous round's model: that round's row is complete
            previous = evaluation.aggregate(strategy, server_round - 1, list(screened.evaluations.values()), self.task)
            self.rows[-1].update(self._federated_fields(previous))
            if self.test_set is None:  # no central evaluation: the row shows the federated one
                self.rows[-1].update(self._shown(previous.metrics))

        last = server_round == self.config.federation.rounds
        pending = self.rides and not last  # this model's evaluation rides on the next round's train messages
        federated = evaluation.Evaluated()
        if not pending:
            federated = evaluation.federated_evaluation(
                grid, strategy, server_round, state, self.run_id, self.book, self.privacy, self.task
            )
        central = self._central_evaluation(state)
        row = {
            "round": server_round,
            "metric": self.task.headline,  # what `accuracy` holds: the task's headline metric
            **self._shown(central if central is not None else federated.metrics),
            **self._federated_fields(federated),
            "federated_pending": pending,
            "train_loss": screened.train_loss.mean,
            "train_loss_std": screened.train_loss.std,
            "clients_ok": strategy.usable,
            "clients_refused": len(screened.refused),
            "clients_failed": len(screened.failed),
            "epsilon_max": max((p.epsilon for p in self.privacy.values()), default=0.0),
            "epsilon": {cid: p.epsilon for cid, p in sorted(self.privacy.items())},
            "client_epsilon": central_dp.spent_epsilon(strategy.inner),
            "client_clipping_norm": getattr(strategy.inner, "clipping_norm", None),
            "refused": dict(screened.refused),
            "failed": dict(screened.failed),
            "bytes_up": dict(sorted(screened.bytes_up.items())),  # each client's train reply, as it travelled
            "update_bytes": dict(sorted(screened.update_bytes.items())),  # of which its update
            "seconds": round(time.monotonic() - started, 3),
            **trained.row,
        }
        self.rows.append(row)
        # Refusals of a spent budget are policy working as meant: the run goes on with who is left. Failures,
        # and clients refusing the run itself, stop it when too few usable updates remain.
        enough = strategy.usable >= self.config.federation.min_fit_clients
        lost = bool(screened.failed or screened.refused_by_policy)
        stops = lost and not enough and not (set(screened.refused) - screened.refused_by_policy)
        record = RoundRecord(
            server_round, row, state, strategy.inner, stops or server_round == self.config.federation.rounds
        )
        for observer in self.observers:
            observer.after_round(record)
        if stops:
            lost_clients = {**screened.failed, **{n: screened.refused[n] for n in screened.refused_by_policy}}
            name, reason = next(iter(lost_clients.items()))
            raise FedtrainError(
                f"round {server_round}: {strategy.usable} usable updates, fewer than min_fit_clients = "
                f"{self.config.federation.min_fit_clients} ({len(screened.failed)} failed, "
                f"{len(screened.refused_by_policy)} "
                f"refused the run, e.g. {name}: {reason}); the run stops, its last good model is in "
                f"{self.run_dir / CHECKPOINT_FILE}."
            )
        return state

    def _wait_for_clients(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.config.federation.round_timeout
        needed = self.clients_needed
        while (online := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() > deadline:
                raise FedtrainError(
                    f"round {server_round}: {online} clients online, fewer than {self.waiting_for} = {needed}, for "
                    f"round_timeout ({self.config.federation.round_timeout:.0f} s); the run stops, its last good "
                    "model is in "
                    f"{self.run_dir / CHECKPOINT_FILE}."
                )
            time.sleep(1)

    def _configure_train(
        self, grid: Grid, strategy: ScreenedStrategy, server_round: int, state: OrderedDict
    ) -> list[Message]:
        try:
            # fedtrain's run id: clients key their stored ledgers by it, and it survives a resume
            sent = ConfigRecord({protocol.RUN_ID: self.run_id})
            if self.rides and server_round > 1:  # the model they get is the last round's: evaluate it first
                sent[protocol.EVALUATE_FIRST] = True
            return list(strategy.configure_train(server_round, ArrayRecord(state), sent, grid))
        except PrivacyBudgetExhausted:
            spent = central_dp.spent_epsilon(strategy.inner)
            raise FedtrainError(
                f"round {server_round}: another release would take client-level epsilon past max_client_epsilon = "
                f"{self.config.privacy.max_client_epsilon:g} (spent {spent:.3f}); the run stops, its last model is in "
                f"{self.run_dir / CHECKPOINT_FILE}."
            ) from None
        except ValueError as exc:  # Flower's DP wrapper: the sample is not the size the noise was set for
            raise FedtrainError(f"round {server_round}: client-level DP cannot run this round ({exc}).") from None

    def _shown(self, metrics: dict[str, float]) -> dict[str, float]:
        """A row's `accuracy` (the task's headline metric) and `loss`: central where the server has a test
        split (simulation), else federated."""
        return {"accuracy": metrics.get(self.task.headline, float("nan")), "loss": metrics.get("loss", float("nan"))}

    def _federated_fields(self, federated: evaluation.Evaluated) -> dict[str, Any]:
        """A row's federated evaluation; `federated_pending` is false once it is in."""
        headline = self.task.headline
        return {
            "federated_accuracy": federated.metrics.get(headline, float("nan")),
            "federated_accuracy_std": federated.std.get(headline, float("nan")),
            "federated_loss": federated.metrics.get("loss", float("nan")),
            "federated_loss_std": federated.std.get("loss", float("nan")),
            "federated": federated.metrics,
            "federated_pending": False,
        }

    def _central_evaluation(self, state: OrderedDict) -> dict[str, float] | None:
        """The task's metrics on the server's own test split (simulation), or None without one."""
        if self.test_set is None:
            return None
        self.model.load_state_dict(state)
        return evaluate_task(self.model, self.test_set, self.device, self.task)

    def _log_round(self, row: dict[str, Any]) -> None:
        log.info(
            "round %d/%d: accuracy %.4f, max epsilon %.3f, clients ok %d, refused %d, failed %d",
            row["round"],
            self.config.federation.rounds,
            row["accuracy"],
            row["epsilon_max"],
            row["clients_ok"],
            row["clients_refused"],
            row["clients_failed"],
        )
