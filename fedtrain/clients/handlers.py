"""What fedtrain's ClientApp does with a message (clients/app.py wires it to Flower).

Every message, train or evaluate, is first checked against this client's own policy, before any
data is touched; then the client opens its lifetime ledger for this shard and this run, and plans
the run once (noise for DP-SGD and for metric releases, clients/../privacy/calibration.py).

train:    refuse if this round (training + its train-loss release) would pass the run's or the
          shard's lifetime cap; else DP-SGD on the private shard, release the train loss through the
          Gaussian mechanism, record both on the ledger (sealed on disk) *before* replying with the
          update d = w_local - w_global, the public count and the privacy record.
evaluate: the same for one release of the held-out loss and accuracy.

Failures leave as a category only ("data error", "model mismatch"...): the full text stays in this
client's log, never in a reply. Where the data is: a real node names its shard with
`--node-config data-path=...`; a simulated node gets Flower's `partition-id`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from fedtrain import protocol, training_defaults
from fedtrain.clients.setup import ClientSetup, client_id
from fedtrain.clients.trainer import TrainSettings, planned_round, train_round
from fedtrain.config import Config
from fedtrain.data import Dataset, load_shard
from fedtrain.device import resolve_device
from fedtrain.errors import FedtrainError
from fedtrain.evaluation import per_example
from fedtrain.models import build_model
from fedtrain.partition import holdout_split, simulation_shard
from fedtrain.privacy.accountants import epsilon
from fedtrain.privacy.calibration import RunPlan, client_delta, plan_run
from fedtrain.privacy.fingerprint import ShardIdentity, identify
from fedtrain.privacy.ledger import LedgerEntry
from fedtrain.privacy.lifetime import LedgerStore, RunView
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.privacy.releases import Release, exact_means, private_means
from fedtrain.training_defaults import LocalTraining

log = logging.getLogger("fedtrain")
_IN_MEMORY = ClientSetup()  # handlers called directly (tests) keep their ledgers here


class ClientFailure(Exception):
    """A failure on this client, with the only thing about it the server may learn: its category."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category


@contextlib.contextmanager
def failing_as(category: str) -> Iterator[None]:
    """Anything that goes wrong inside is reported to the server as `category` (and logged here)."""
    try:
        yield
    except ClientFailure:
        raise
    except Exception as exc:
        raise ClientFailure(category, f"{type(exc).__name__}: {exc}") from exc


def guarded(handler: Callable[..., Message]) -> Callable[..., Message]:
    """Run a handler; turn any exception into a category-only error reply, the full text to the log."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context, *args, **kwargs) -> Message:
        try:
            return handler(msg, context, *args, **kwargs)
        except ClientFailure as failure:
            category, detail = failure.category, str(failure)
        except FedtrainError as exc:
            category, detail = "internal error", str(exc)
        except Exception as exc:  # a bug: its text may hold data, so it stays here too
            category, detail = "internal error", f"{type(exc).__name__}: {exc}"
            log.exception("client %s: %s handler failed", client_id(context), msg.metadata.message_type)
        log.error(
            "client %s: %s (%s); the server is told only %r",
            client_id(context),
            detail,
            msg.metadata.message_type,
            category,
        )
        return protocol.error_reply(msg, category, client_id(context))

    return run


# ---------------------------------------------------------------- the client's data


@functools.lru_cache(maxsize=4)
def _splits(key: tuple, data_path: str | None, partition_id: int | None) -> tuple[Dataset, Dataset, ShardIdentity]:
    config = Config.from_run_config(dict(key))
    if data_path is not None:
        shard, seed = load_shard(data_path, config), config.federation.seed
    else:
        assert partition_id is not None  # a simulated node
        shard, seed = simulation_shard(config, partition_id), config.federation.seed * 1_000_003 + partition_id
    train_idx, held_idx = holdout_split(len(shard), config.data.eval_fraction, seed)
    return shard.subset(train_idx), shard.subset(held_idx), identify(shard.x, shard.y)


def client_data(config: Config, context: Context) -> tuple[Dataset, Dataset, ShardIdentity]:
    """(train, held-out) splits of this client's private shard, and the whole shard's identity."""
    node_config = context.node_config
    key = tuple(sorted(config.to_run_config().items()))
    if "data-path" in node_config:
        return _splits(key, str(node_config["data-path"]), None)
    if "partition-id" in node_config:
        return _splits(key, None, int(node_config["partition-id"]))
    raise FedtrainError("this node has no data: start it with --data PATH (node config data-path).")


def _device(config: Config, context: Context) -> torch.device:
    """A real node may choose its own device (`fedtrain client --device`); otherwise the run's."""
    return resolve_device(str(context.node_config.get("device", config.training.device)))


def _model_for(config: Config, data: Dataset, arrays: ArrayRecord) -> torch.nn.Module:
    num_classes = config.data.num_classes or len(config.data.labels or []) or data.num_classes
    model = build_model(config.training.model, data.input_shape, num_classes, hidden=config.training.hidden)
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FedtrainError(
            f"the server's model does not fit this client's model ({first}); both must use the same "
            "model, input shape and classes."
        ) from None
    return model


def _settings(config: Config, context: Context, local: LocalTraining) -> TrainSettings:
    return TrainSettings(
        local.batch_size,
        local.local_epochs,
        local.lr,
        config.training.momentum,
        local.max_grad_norm,
        # a real node may set its own (`fedtrain client --max-physical-batch-size`): its GPU, its memory
        max_physical_batch_size=int(context.node_config.get("max-physical-batch-size", 0))
        or config.training.max_physical_batch_size,
    )


def loss_bound(num_classes: int) -> float:
    """Per-example cross-entropy counts up to twice a uniform guess's (ln K each): a released loss
    sum moves by at most this much when one example is added or removed."""
    return 2.0 * math.log(max(2, num_classes))


# ---------------------------------------------------------------- one message's session


@dataclass
class Session:
    """This client, for one message: its policy, data, lifetime ledger and the run's plan."""

    name: str
    config: Config
    policy: ClientPolicy
    train: Dataset
    held_out: Dataset
    shard: ShardIdentity
    store: LedgerStore
    view: RunView
    plan: RunPlan
    lifetime_delta: float

    @property
    def mode(self) -> str:
        return self.config.privacy.metrics

    @property
    def num_classes(self) -> int:
        return self.config.data.num_classes or len(self.config.data.labels or []) or self.train.num_classes

    def release_entry(self) -> list[LedgerEntry]:
        """The ledger entry one private metric release costs (none unless metrics are private)."""
        return [LedgerEntry.release(self.plan.metrics_noise)] if self.plan.metrics_noise is not None else []

    def releases_left(self) -> int:
        """Metric releases this run's plan still has (metrics get their stated share, never more)."""
        return self.plan.releases - sum(1 for e in self.view.run_entries if e.kind == "metrics")

    def over_budget(self, planned: list[LedgerEntry]) -> str | None:
        """Why spending `planned` now would break the run's plan, its cap or the lifetime cap, or None."""
        if sum(1 for e in planned if e.kind == "metrics") > self.releases_left():
            # metrics get their stated share of the budget, never more, however often the server asks
            return f"{self.name} refuses: the run planned {self.plan.releases} metric releases and has had them all"
        run_ledger = self.view.run_ledger(self.plan.delta, self.plan.accountant)
        cap, projected = self.policy.run_cap(self.config), run_ledger.epsilon(*planned)
        if projected > cap * (1 + 1e-9):
            return (
                f"{self.name} refuses: this would raise the run's epsilon from {run_ledger.epsilon():.3f} to "
                f"{projected:.3f}, over the budget of {cap:g} for this run (delta {self.plan.delta:g})"
            )
        lifetime = self.view.lifetime_ledger(self.lifetime_delta, self.policy.accountant)
        projected = lifetime.epsilon(*planned)
        if projected > self.policy.max_lifetime_epsilon * (1 + 1e-9):
            return (
                f"{self.name} refuses: this would raise the lifetime epsilon of its data from {lifetime.epsilon():.3f} "
                f"to {projected:.3f}, over its max_lifetime_epsilon {self.policy.max_lifetime_epsilon:g} "
                f"(delta {self.lifetime_delta:g})"
            )
        return None

    def report(self, view: RunView | None = None) -> protocol.PrivacyReport:
        view = view or self.view
        ledger = view.run_ledger(self.plan.delta, self.plan.accountant)
        lifetime = None
        if self.policy.share_lifetime_epsilon:
            lifetime = view.lifetime_ledger(self.lifetime_delta, self.policy.accountant).epsilon()
        return protocol.PrivacyReport(self.name, ledger, ledger.epsilon(), lifetime, self.mode)

    def release(self, values: np.ndarray, bounds: list[float]) -> Release:
        if self.plan.metrics_noise is None:  # "plain": the policy allowed it, and privacy.json says so
            return exact_means(values, np.asarray(bounds))
        return private_means(values, np.asarray(bounds), self.plan.metrics_noise)

    def record(self, entries: list[LedgerEntry]) -> RunView:
        """Write `entries` to the sealed ledger: always before what they pay for leaves the client."""
        with failing_as("ledger error"):
            self.view = self.store.record(self.shard, self.view.run, self.plan, entries)
        return self.view


def _settings_digest(config: Config, records: int) -> str:
    """What a run's plan depends on: a change midway is refused, never silently re-planned."""
    keys = (
        "rounds",
        "batch_size",
        "local_epochs",
        "target_epsilon",
        "noise_multiplier",
        "delta",
        "accountant",
        "metrics",
        "eval_fraction",
        "fraction_evaluate",
        "seed",
    )
    return hashlib.sha256(repr([(k, config.value(k)) for k in keys] + [records]).encode()).hexdigest()[:16]


def _plan(
    config: Config, policy: ClientPolicy, train: Dataset, held_out: Dataset, delta: float, digest: str
) -> RunPlan:
    private = config.privacy.metrics == "private"
    evaluations = (
        config.federation.rounds if private and config.federation.fraction_evaluate > 0 and len(held_out) else 0
    )
    releases = (config.federation.rounds if private else 0) + evaluations

    def plan(
        sample_rate: float,
        steps_per_round: int,
        accountant: str,
        noise: float | None = config.privacy.noise_multiplier,
        training: dict[str, Any] | None = None,
    ) -> RunPlan:
        return plan_run(
            target_epsilon=config.privacy.target_epsilon,
            noise_multiplier=noise,
            metrics_share=policy.metrics_share,
            releases=releases,
            sample_rate=sample_rate,
            steps_per_round=steps_per_round,
            rounds=config.federation.rounds,
            delta=delta,
            accountant=accountant,
            settings=digest,
            training=training,
        )

    def run_epsilon(noise: float, sample_rate: float, steps_per_round: int) -> float:
        """The whole run's epsilon at this noise (RDP: fast, and the rules only compare batch sizes)."""
        return epsilon(plan(sample_rate, steps_per_round, "rdp", noise).planned_mechanisms(), delta, "rdp")

    local = training_defaults.resolve(config, len(train), epsilon_at=run_epsilon)
    settings = TrainSettings(local.batch_size, local.local_epochs, local.lr, 0.0, local.max_grad_norm)
    step = planned_round(len(train), settings, 1.0)
    if local.chosen:
        log.info(
            "local DP-SGD for %d examples: batch %d, %d local epoch(s), lr %.4g, clipping %g (by rule: %s)",
            len(train), local.batch_size, local.local_epochs, local.lr, local.max_grad_norm, ", ".join(local.chosen),
        )  # fmt: skip
    return plan(step.sample_rate, step.steps, config.privacy.accountant, training=local.to_dict())


def local_training(config: Config, plan: RunPlan, num_samples: int) -> LocalTraining:
    """The local DP-SGD settings of this run, as its plan fixed them. A plan written before clients
    chose them has only its sample rate and steps: the batch and epochs follow from those."""
    if plan.training is not None:
        return LocalTraining.from_dict(plan.training)
    steps_per_epoch = max(1, round(1 / plan.sample_rate))
    fixed = config.replace(
        batch_size=math.ceil(num_samples / steps_per_epoch),
        local_epochs=max(1, plan.steps_per_round // steps_per_epoch),
    )
    return training_defaults.resolve(fixed, num_samples)


def open_session(msg: Message, context: Context, config: Config, setup: ClientSetup) -> Session | Message:
    """This client's session for `msg`, or the refusal to send when the run breaks its policy."""
    name = client_id(context)
    with failing_as("policy error"):
        policy = setup.policy_for(context, config)
    reason = policy.refusal_for_run(config)
    if reason is not None:
        log.warning("%s refuses this run: %s", name, reason)
        return protocol.refusal_reply(msg, f"{name} refuses this run: {reason}", protocol.POLICY, None, name)
    with failing_as("data error"):
        train, held_out, shard = client_data(config, context)
    with failing_as("ledger error"):
        store = setup.store_for(context, config)
        run = str(protocol.sent_config(msg).get(protocol.RUN_ID, context.run_id))
        view = store.view(shard, run)
    largest_delta = client_delta(shard.records, policy.delta)
    delta = config.privacy.delta if config.privacy.delta is not None else largest_delta
    digest = _settings_digest(config, shard.records)
    if view.plan is not None and view.plan.settings != digest:
        reason = "the run's settings changed since this client planned it; a run keeps its settings to the end"
        return protocol.refusal_reply(msg, f"{name} refuses this run: {reason}", protocol.POLICY, None, name)
    with failing_as("policy error"):
        plan = view.plan or _plan(config, policy, train, held_out, delta, digest)
    reason = policy.refusal_for_plan(plan, largest_delta)
    if reason is not None:
        log.warning("%s refuses this run: %s", name, reason)
        return protocol.refusal_reply(msg, f"{name} refuses this run: {reason}", protocol.POLICY, None, name)
    return Session(name, config, policy, train, held_out, shard, store, view, plan, largest_delta)


# ---------------------------------------------------------------- the two handlers


@guarded
def handle_train(msg: Message, context: Context, config: Config, setup: ClientSetup | None = None) -> Message:
    torch.set_num_threads(1)  # simulated clients share the cores; one thread each is fastest
    session = open_session(msg, context, config, setup or _IN_MEMORY)
    if isinstance(session, Message):
        return session
    plan = session.plan
    step = LedgerEntry(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    # the train loss is released while the plan has releases left (a server asking for more evaluations
    # than it declared uses them up): training itself goes on
    loss_release = session.release_entry() if session.mode != "none" and session.releases_left() > 0 else []
    reason = session.over_budget([step, *loss_release])
    if reason is not None:
        log.warning(reason)
        return protocol.refusal_reply(msg, reason, protocol.BUDGET, session.report(), session.name)

    settings = _settings(config, context, local_training(config, plan, len(session.train)))
    sent = protocol.sent_config(msg)
    if protocol.PROXIMAL_MU in sent:  # FedProx
        settings = dataclasses.replace(settings, proximal_mu=protocol.number(sent[protocol.PROXIMAL_MU]))
    with failing_as("model mismatch"):
        model = _model_for(config, session.train, protocol.global_arrays(msg))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = _device(config, context)
    run_ledger = session.view.run_ledger(plan.delta, plan.accountant)
    result = train_round(model, session.train, settings, plan.noise_multiplier, run_ledger, device)
    entries = [result.entry]
    metrics: protocol.Metrics = {protocol.NUM_EXAMPLES: len(session.train)}  # public: the sample rate is N's
    if session.mode == "plain" or loss_release:
        losses, _ = per_example(model, session.train, device)
        released = session.release(losses[:, None], [loss_bound(session.num_classes)])
        metrics[protocol.TRAIN_LOSS] = float(released.means[0])
        metrics[protocol.TRAIN_LOSS + protocol.STD] = float(released.std[0])
        entries += [released.entry] if released.entry is not None else []
    view = session.record(entries)
    update = {k: (v.detach().cpu() - start[k]) for k, v in model.state_dict().items()}
    return protocol.update_reply(msg, ArrayRecord(update), metrics, session.report(view))


@guarded
def handle_evaluate(msg: Message, context: Context, config: Config, setup: ClientSetup | None = None) -> Message:
    torch.set_num_threads(1)
    session = open_session(msg, context, config, setup or _IN_MEMORY)
    if isinstance(session, Message):
        return session
    count = len(session.held_out)
    if count == 0 or session.mode == "none":
        return protocol.metrics_reply(msg, {protocol.NUM_EXAMPLES: count}, session.report())
    reason = session.over_budget(session.release_entry())
    if reason is not None:
        log.warning(reason)
        return protocol.refusal_reply(msg, reason, protocol.BUDGET, session.report(), session.name)
    with failing_as("model mismatch"):
        model = _model_for(config, session.train, protocol.global_arrays(msg))
    device = _device(config, context)
    losses, correct = per_example(model.to(device), session.held_out, device)
    released = session.release(np.stack([losses, correct], axis=1), [loss_bound(session.num_classes), 1.0])
    view = session.record([released.entry]) if released.entry is not None else session.view
    metrics: protocol.Metrics = {
        protocol.NUM_EXAMPLES: count,
        protocol.EVAL_LOSS: float(released.means[0]),
        protocol.EVAL_LOSS + protocol.STD: float(released.std[0]),
        protocol.EVAL_ACCURACY: float(released.means[1]),
        protocol.EVAL_ACCURACY + protocol.STD: float(released.std[1]),
    }
    return protocol.metrics_reply(msg, metrics, session.report(view))
