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
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from fedtrain import protocol, training_defaults
from fedtrain.clients.local_processes import processes_refusal, train_in_processes
from fedtrain.clients.setup import ClientSetup, client_id
from fedtrain.clients.trainer import TrainSettings, planned_round, train_round
from fedtrain.clients.update_compression import compress_update
from fedtrain.components import ClientProbe, Components, model_for, outputs_for, task_for
from fedtrain.config import FLAT, Config
from fedtrain.data import Dataset, load_shard
from fedtrain.data.partition import held_out_seed, holdout_split, simulation_shard
from fedtrain.device import resolve_device
from fedtrain.errors import FedtrainError
from fedtrain.evaluation import example_values
from fedtrain.memory import return_large_buffers
from fedtrain.models import build_model
from fedtrain.privacy.accountants import epsilon
from fedtrain.privacy.calibration import RunPlan, client_delta, plan_run
from fedtrain.privacy.fingerprint import ShardIdentity, identify
from fedtrain.privacy.ledger import LedgerEntry
from fedtrain.privacy.lifetime import LedgerStore, RunView
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.privacy.preflight import PreflightRefusal
from fedtrain.privacy.releases import Release, exact_means, private_means
from fedtrain.privacy.tuning import TrialCount
from fedtrain.tasks import Classification, Task
from fedtrain.training_defaults import LocalTraining

log = logging.getLogger("fedtrain")
_IN_MEMORY = ClientSetup()  # handlers called directly (tests) keep their ledgers here


return_large_buffers()  # batches read lazily: a client's memory must not grow with its data (fedtrain/memory.py)


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


# Fields of the data section that say how a shard is split or how a simulation cuts a dataset: a shard
# file reads the same whatever they are (flat keys; `data` is the simulation's source).
_SPLITTING = frozenset({"data", "eval_fraction", "test_fraction", "partition", "alpha"})
_READING = tuple(key for key, (section, _) in FLAT.items() if section == "data" and key not in _SPLITTING)


_READS: list[tuple[int, list[str]]] = []  # (process, the arguments of read_shard_again) of every read


@functools.lru_cache(maxsize=4)
def _read_shard(path: str, stamp: tuple[int, int], reading: str, target_kind: str) -> tuple[Dataset, ShardIdentity]:
    shard = load_shard(path, Config(**json.loads(reading)), target_kind=target_kind)
    _READS.append((os.getpid(), [path, reading, target_kind]))
    return shard, identify(shard)


def shard_reads() -> list[list[str]]:
    """The shards this process read itself (none when it found them in a warm worker's cache)."""
    return [args for pid, args in _READS if pid == os.getpid()]


def read_shard_again(path: str, reading: str, target_kind: str) -> None:
    """Read a shard as a task of this process's children did (`shard_reads`), for the tasks after it."""
    stat = Path(path).expanduser().stat()
    _read_shard(path, (stat.st_mtime_ns, stat.st_size), reading, target_kind)


def read_shard(path: str, config: Config, target_kind: str) -> tuple[Dataset, ShardIdentity]:
    """A real node's shard, as `config` reads it, and its identity (every record's digest: a pass over
    the whole shard). Cached per file version and reading settings: a warm worker reads it once
    before its first task (clients/pinned_app.py), and every task forked from it has it."""
    stat = Path(path).expanduser().stat()
    reading = json.dumps({key: config.value(key) for key in _READING}, sort_keys=True)
    return _read_shard(path, (stat.st_mtime_ns, stat.st_size), reading, target_kind)


@functools.lru_cache(maxsize=4)
def _simulated_shard(
    key: tuple, target_kind: str, partition_id: int, source: Dataset | None
) -> tuple[Dataset, ShardIdentity]:
    config = Config.from_run_config(dict(key))
    shard = simulation_shard(config, partition_id, source, target_kind)
    return shard, identify(shard)


def client_data(
    config: Config, context: Context, task: Task, components: Components | None = None
) -> tuple[Dataset, Dataset, ShardIdentity]:
    """(train, held-out) splits of this client's private shard, and the whole shard's identity."""
    node_config = context.node_config
    if "data-path" in node_config:
        shard, identity = read_shard(str(node_config["data-path"]), config, task.target_kind)
        seed = held_out_seed(config)
    elif "partition-id" in node_config:
        partition = int(node_config["partition-id"])
        key = tuple(sorted(config.to_run_config().items()))
        source = components.dataset if components is not None else None
        shard, identity = _simulated_shard(key, task.target_kind, partition, source)
        seed = held_out_seed(config, partition)
    else:
        raise FedtrainError("this node has no data: start it with --data PATH (node config data-path).")
    train_idx, held_idx = holdout_split(len(shard), config.data.eval_fraction, seed)
    return shard.subset(train_idx), shard.subset(held_idx), identity


def _device(config: Config, context: Context) -> torch.device:
    """A real node may choose its own device (`fedtrain client --device`); otherwise the run's."""
    return resolve_device(str(context.node_config.get("device", config.training.device)))


def _model_for(session: Session, arrays: ArrayRecord) -> torch.nn.Module:
    config = session.config
    spec = model_for(config, session.components)
    model = build_model(spec, session.train.input_shape, session.outputs, hidden=config.training.hidden)
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
        grad_sample_mode=config.training.grad_sample_mode,
        grad_sample_memory_mib=config.training.grad_sample_memory_mib,  # unset: a quarter of this node's device
        precision=config.training.precision,
    )


def _processes(session: Session, context: Context, settings: TrainSettings, device: torch.device) -> int:
    """How many local processes train this node's rounds (`fedtrain client --processes`): the node's own
    choice, never the server's; it changes nothing the ledger records.

    Raises:
        FedtrainError: a setting this node cannot run, in one sentence, before anything is trained.
    """
    raw = context.node_config.get("processes", 1)
    try:
        processes = int(raw)
    except (TypeError, ValueError):
        raise FedtrainError(f"processes must be a whole number, not {raw!r}.") from None
    reason = processes_refusal(processes, len(session.train), settings, device)
    if reason is None and processes > 1 and session.probe is not None:
        reason = "an audit's canary client trains in one process; processes must be 1."
    if reason is not None:
        raise FedtrainError(reason)
    return processes


def loss_bound(num_classes: int) -> float:
    """Per-example cross-entropy counts up to twice a uniform guess's (ln K each): a released loss
    sum moves by at most this much when one example is added or removed (tasks.Classification)."""
    return Classification().bounds(num_classes)[0]


def trainable_update(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d = w_local - w_global of the trained parameters only: a frozen backbone is neither noised nor sent."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() - start[k] for k, v in model.state_dict().items() if k in trained}


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
    task: Task
    outputs: int  # per sample: classes, labels or regression targets
    components: Components | None
    probe: ClientProbe | None = None  # `fedtrain audit`'s canary client only (components.py)

    @property
    def mode(self) -> str:
        return self.config.privacy.metrics

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
        if not math.isfinite(projected):  # only a noise of 0 has no finite epsilon; a cap of inf would let it by
            return (
                f"{self.name} refuses: no finite epsilon would bound this run's privacy loss (the accountant gives "
                f"{projected}), so its data would have no privacy guarantee"
            )
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
        "tuning_trials",
        "tuning_eta",
        "tuning_id",
    )
    return hashlib.sha256(repr([(k, config.value(k)) for k in keys] + [records]).encode()).hexdigest()[:16]


def _releases(config: Config, held_out: int) -> int:
    """Private metric releases the run plans: a train loss per round, a held-out evaluation per round."""
    private = config.privacy.metrics == "private"
    evaluations = config.federation.rounds if private and config.federation.fraction_evaluate > 0 and held_out else 0
    return (config.federation.rounds if private else 0) + evaluations


def _plan_for(config: Config, policy: ClientPolicy, releases: int, delta: float, digest: str) -> Callable[..., RunPlan]:
    def plan(
        sample_rate: float,
        steps_per_round: int,
        accountant: str,
        noise: float | None = config.privacy.noise_multiplier,
        training: dict[str, Any] | None = None,
        trials: TrialCount | None = None,
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
            trials=trials,
        )

    return plan


def chosen_training(
    config: Config, policy: ClientPolicy, num_train: int, num_held_out: int, delta: float
) -> LocalTraining:
    """The local DP-SGD settings a client with `num_train` training and `num_held_out` held-out examples
    chooses for a run of `config` (the run's values, and the rules' where it sets none).

    Args:
        config: the run's config.
        policy: the client's policy (its metrics share enters the run's epsilon).
        num_train: training examples N.
        num_held_out: held-out examples (a client with none plans no evaluation releases).
        delta: the run's delta.

    Returns:
        The settings, with the names of those a rule chose.

    Raises:
        FedtrainError: when the client has no training example.
    """
    plan = _plan_for(config, policy, _releases(config, num_held_out), delta, "")

    def run_epsilon(noise: float, sample_rate: float, steps_per_round: int) -> float:
        """The whole run's epsilon at this noise (RDP: fast, and the rules only compare batch sizes). For a
        tuning, that of one plain run: every trial has the batch it gives, and the tuning's own noise."""
        return epsilon(plan(sample_rate, steps_per_round, "rdp", noise).planned_mechanisms(), delta, "rdp")

    return training_defaults.resolve(config, num_train, epsilon_at=run_epsilon)


def _plan(
    config: Config, policy: ClientPolicy, train: Dataset, held_out: Dataset, delta: float, digest: str
) -> RunPlan:
    local = chosen_training(config, policy, len(train), len(held_out), delta)
    settings = TrainSettings(local.batch_size, local.local_epochs, local.lr, 0.0, local.max_grad_norm)
    step = planned_round(len(train), settings, 1.0)
    tuning = config.privacy.tuning_trials
    trials = None if tuning is None else TrialCount.with_mean(tuning, config.privacy.tuning_eta)
    planned = _plan_for(config, policy, _releases(config, len(held_out)), delta, digest)(
        step.sample_rate, step.steps, config.privacy.accountant, training=local.to_dict(), trials=trials
    )
    # the plan keeps the settings the client will train with: rule 5 at the noise just calibrated
    local = local_training(config, planned, len(train))
    if local.chosen:
        log.info(
            "local DP-SGD for %d examples: batch %d, %d local epoch(s), lr %.4g, clipping %g (by rule: %s)",
            len(train), local.batch_size, local.local_epochs, local.lr, local.max_grad_norm, ", ".join(local.chosen),
        )  # fmt: skip
    return dataclasses.replace(planned, training=local.to_dict())


def local_training(config: Config, plan: RunPlan, num_samples: int) -> LocalTraining:
    """The local DP-SGD settings of this message: the batch size and local epochs its run's plan fixed
    (they are the mechanism the noise was calibrated for), the learning rate and clipping bound from
    this message's config, by rule where it sets none (they leave the privacy analysis unchanged, and
    a tuning's trials, which share one plan, each bring their own). A plan written before clients chose
    them has only its sample rate and steps: the batch and epochs follow from those."""
    if plan.training is not None:
        planned = LocalTraining.from_dict(plan.training)
        batch, epochs = planned.batch_size, planned.local_epochs
        by_rule = [name for name in ("batch_size", "local_epochs") if name in planned.chosen]
    else:
        steps_per_epoch = max(1, round(1 / plan.sample_rate))
        batch, epochs = math.ceil(num_samples / steps_per_epoch), max(1, plan.steps_per_round // steps_per_epoch)
        by_rule = []
    # rule 5 (few examples) scales the rule's step by the plan's calibrated noise: the noise this client adds
    local = training_defaults.resolve(
        config.replace(batch_size=batch, local_epochs=epochs), num_samples, noise_multiplier=plan.noise_multiplier
    )
    return dataclasses.replace(local, chosen=(*by_rule, *local.chosen))


def open_session(msg: Message, context: Context, config: Config, setup: ClientSetup) -> Session | Message:
    """This client's session for `msg`, or the refusal to send when the run breaks its policy."""
    name = client_id(context)
    with failing_as("policy error"):
        policy = setup.policy_for(context, config)
    reason = policy.refusal_for_run(config) or _tuning_refusal(config, context)
    if reason is not None:
        log.warning("%s refuses this run: %s", name, reason)
        return protocol.refusal_reply(msg, f"{name} refuses this run: {reason}", protocol.POLICY, None, name)
    with failing_as("policy error"):
        task = task_for(config, setup.components)
        outputs = outputs_for(config, task)
    with failing_as("data error"):
        train, held_out, shard = client_data(config, context, task, setup.components)
    probe = setup.components.probe.client(name) if setup.components and setup.components.probe else None
    if probe is not None:
        train = probe.train_split(train)
    with failing_as("ledger error"):
        store = setup.store_for(context, config)
        run = str(protocol.sent_config(msg).get(protocol.RUN_ID, context.run_id))
        if config.privacy.tuning_trials is not None:  # every trial of a tuning is one entry of the ledger
            run = f"tuning-{config.privacy.tuning_id}"
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
    return Session(name, config, policy, train, held_out, shard, store, view, plan, largest_delta, task, outputs,
                   setup.components, probe)  # fmt: skip


def _tuning_refusal(config: Config, context: Context) -> str | None:
    """A tuning's guarantee holds only if nothing but its best trial leaves and its number of trials
    stays secret (privacy/tuning.py): a federation's server sees every trial, so a real node refuses."""
    if config.privacy.tuning_trials is not None and "kit" in context.node_config:
        return (
            "private hyperparameter tuning runs only in simulation: a server that sees every trial is not "
            "covered by its guarantee"
        )
    return None


def _charge_tuning(session: Session) -> str | None:
    """A tuning's trial: the whole tuning is one ledger entry, charged before its first trial trains;
    every trial's steps are covered by it. Returns why the client refuses, or None."""
    if any(e.kind == "tuning" for e in session.view.run_entries):
        return None
    entry = session.plan.tuning_entry()
    reason = session.over_budget([entry])
    if reason is None:
        session.record([entry])
    return reason


# ---------------------------------------------------------------- the two handlers


def _evaluates(session: Session) -> bool:
    """Whether this client releases held-out metrics at all (it holds some data out, and the run's
    metrics are not "none"); otherwise an evaluation releases only the public count."""
    return len(session.held_out) > 0 and session.mode != "none"


def _evaluate(session: Session, model: torch.nn.Module, device: torch.device) -> tuple[protocol.Metrics, list]:
    """The task's values of `model` on the held-out split, released (the Gaussian mechanism, or exact
    under "plain"): the metrics, and the ledger entries the release costs."""
    with failing_as("policy error"):  # e.g. a regression run without the targets' public range
        bounds = session.task.bounds(session.outputs)
    values = example_values(model.to(device), session.held_out, device, session.task)
    released = session.release(values, bounds)
    metrics: protocol.Metrics = {}
    for name, mean, std in zip(session.task.values, released.means, released.std, strict=True):
        metrics[protocol.eval_key(name)] = float(mean)
        metrics[protocol.eval_key(name) + protocol.STD] = float(std)
    return metrics, [released.entry] if released.entry is not None else []


@guarded
def handle_train(msg: Message, context: Context, config: Config, setup: ClientSetup | None = None) -> Message:
    """Train on the global model the message carries; when it asks (protocol.EVALUATE_FIRST), evaluate
    that model on the held-out split first, exactly as an evaluate message before it would: the same
    release, checked against the same budget first, on the ledger in the same order."""
    torch.set_num_threads(1)  # simulated clients share the cores; one thread each is fastest
    session = open_session(msg, context, config, setup or _IN_MEMORY)
    if isinstance(session, Message):
        return session
    plan = session.plan
    device = _device(config, context)
    settings = _settings(config, context, local_training(config, plan, len(session.train)))
    processes = _processes(session, context, settings, device)  # a bad setting: refused before anything runs
    sent = protocol.sent_config(msg)
    tuning = plan.trials is not None  # a tuning's trial: its charge covers the trial (_charge_tuning)
    step = None if tuning else LedgerEntry(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    evaluating = protocol.EVALUATE_FIRST in sent and _evaluates(session)
    eval_release = session.release_entry() if evaluating else []

    def loss_release() -> list[LedgerEntry]:
        # the train loss is released while the plan has releases left (a server asking for more evaluations
        # than it declared uses them up): training itself goes on
        left = session.releases_left() - len(eval_release)
        return session.release_entry() if session.mode != "none" and left > 0 and not tuning else []

    # Both at once in the usual case: one projection instead of two (epsilon is a round's costliest sum).
    # If both do not fit, each in turn, as the evaluation, then the training, would have been checked.
    if step is None:
        reason = _charge_tuning(session)
        evaluating, eval_release = False, []  # a trial releases nothing computed on private data
    else:
        reason = session.over_budget([*eval_release, step, *loss_release()])
    if reason is not None and evaluating and step is not None:
        eval_reason = session.over_budget(eval_release)
        if eval_reason is not None:
            log.warning("%s (its evaluation of the global model)", eval_reason)
            evaluating, eval_release = False, []
            reason = session.over_budget([step, *loss_release()])
    if reason is not None and not evaluating:
        log.warning(reason)
        return protocol.refusal_reply(msg, reason, protocol.BUDGET, session.report(), session.name)

    with failing_as("model mismatch"):
        model = _model_for(session, protocol.global_arrays(msg))
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics: protocol.Metrics = {}
    entries: list[LedgerEntry] = []
    if evaluating:
        # rank processes are forked from this one, and a forked child cannot use CUDA its parent initialised
        released, entries = _evaluate(session, model, device if processes == 1 else torch.device("cpu"))
        metrics.update({protocol.HELD_OUT_EXAMPLES: len(session.held_out), **released})
    if reason is not None:  # the evaluation fits the budget, the training does not
        log.warning(reason)
        view = session.record(entries) if entries else session.view
        return protocol.refusal_reply(msg, reason, protocol.BUDGET, session.report(view), session.name, metrics)

    if protocol.PROXIMAL_MU in sent:  # FedProx
        settings = dataclasses.replace(settings, proximal_mu=protocol.number(sent[protocol.PROXIMAL_MU]))
    run_ledger = session.view.run_ledger(plan.delta, plan.accountant)  # a copy
    run_ledger.entries += entries  # the evaluation just released, as if an evaluate message had recorded it
    try:
        if processes > 1:  # the ranks' rank 0 trains `model`; only this process records and replies
            result = train_in_processes(model, session.train, settings, plan.noise_multiplier, run_ledger, device,
                                        session.task, step or planned_round(len(session.train), settings,
                                        plan.noise_multiplier), processes, config.federation.round_timeout)  # fmt: skip
        else:
            result = train_round(model, session.train, settings, plan.noise_multiplier, run_ledger, device,
                                 session.task, planned=step, probe=session.probe)  # fmt: skip
    except PreflightRefusal as refusal:  # before the first step: no training was spent
        log.warning("%s refuses this run: %s", session.name, refusal)
        reason = f"{session.name} refuses this run: {refusal}"
        view = session.record(entries) if entries else session.view  # the evaluation released above
        return protocol.refusal_reply(msg, reason, protocol.POLICY, session.report(view), session.name, metrics)
    if step is not None:  # a trial's steps are covered by its tuning's entry
        entries.append(result.entry)
    metrics[protocol.NUM_EXAMPLES] = len(session.train)  # public: the sample rate is N's
    losses_released = loss_release()
    if session.mode == "plain" or losses_released:
        losses = example_values(model, session.train, device, session.task)[:, :1]  # the task's loss
        released_loss = session.release(losses, session.task.bounds(session.outputs)[:1])
        metrics[protocol.TRAIN_LOSS] = float(released_loss.means[0])
        metrics[protocol.TRAIN_LOSS + protocol.STD] = float(released_loss.std[0])
        entries += [released_loss.entry] if released_loss.entry is not None else []
    view = session.record(entries) if entries else session.view
    update = trainable_update(model, start)
    if session.probe is not None:
        session.probe.sent(start, update, result.entry)
    arrays, compression = compress_update(  # post-processing of d
        {k: v.numpy() for k, v in update.items()}, config, context, session.view.run
    )
    return protocol.update_reply(msg, arrays, metrics, session.report(view), compression)


@guarded
def handle_evaluate(msg: Message, context: Context, config: Config, setup: ClientSetup | None = None) -> Message:
    torch.set_num_threads(1)
    session = open_session(msg, context, config, setup or _IN_MEMORY)
    if isinstance(session, Message):
        return session
    count = len(session.held_out)
    if not _evaluates(session):
        return protocol.metrics_reply(msg, {protocol.NUM_EXAMPLES: count}, session.report())
    reason = session.over_budget(session.release_entry())
    if reason is not None:
        log.warning(reason)
        return protocol.refusal_reply(msg, reason, protocol.BUDGET, session.report(), session.name)
    with failing_as("model mismatch"):
        model = _model_for(session, protocol.global_arrays(msg))
    released, entries = _evaluate(session, model, _device(config, context))
    view = session.record(entries) if entries else session.view
    return protocol.metrics_reply(msg, {protocol.NUM_EXAMPLES: count, **released}, session.report(view))
