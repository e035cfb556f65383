"""What fedtrain's ClientApp does with a message (clients/app.py wires it to Flower).

train:    global weights -> DP-SGD on the private shard -> ledger (cumulative) -> reply the update
          d = w_local - w_global with examples, loss and the epsilon spent so far (all rounds).
          A round that would push epsilon past the budget is refused, with the reason.
evaluate: loss and accuracy of the global model on the client's held-out split.

Where the data is: a real node names its shard with `--node-config data-path=...`; a simulated
node gets Flower's `partition-id` and takes that shard of the run's dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtrain.clients import ledger_store
from fedtrain.clients.encryption_mod import keys_from_kit
from fedtrain.clients.ledger import PrivacyLedger, calibrate_noise, client_delta
from fedtrain.clients.trainer import TrainSettings, planned_round, train_round
from fedtrain.config import Config
from fedtrain.data import Dataset, load_shard
from fedtrain.device import resolve_device
from fedtrain.errors import FedtrainError
from fedtrain.evaluation import evaluate
from fedtrain.models import build_model
from fedtrain.partition import holdout_split, simulation_shard

log = logging.getLogger("fedtrain")

LEDGER_KEY = "fedtrain.ledger"
PLAN_KEY = "fedtrain.plan"


def client_id(context: Context) -> str:
    """A stable, human-readable name for this client in metrics and privacy reports."""
    node_config = context.node_config
    if "client-name" in node_config:
        return str(node_config["client-name"])
    if "partition-id" in node_config:
        return f"client-{int(node_config['partition-id'])}"
    return f"node-{context.node_id}"


@functools.lru_cache(maxsize=4)
def _splits(key: tuple, data_path: str | None, partition_id: int | None) -> tuple[Dataset, Dataset]:
    config = Config.from_run_config(dict(key))
    if data_path is not None:
        shard, seed = load_shard(data_path, config), config.seed
    else:
        shard, seed = simulation_shard(config, int(partition_id)), config.seed * 1_000_003 + int(partition_id)
    train_idx, held_idx = holdout_split(len(shard), config.eval_fraction, seed)
    return shard.subset(train_idx), shard.subset(held_idx)


def client_data(config: Config, context: Context) -> tuple[Dataset, Dataset]:
    """(train, held-out) splits of this client's private shard."""
    node_config = context.node_config
    key = tuple(sorted(config.to_run_config().items()))
    if "data-path" in node_config:
        return _splits(key, str(node_config["data-path"]), None)
    if "partition-id" in node_config:
        return _splits(key, None, int(node_config["partition-id"]))
    raise FedtrainError("this node has no data: start it with --data PATH (node config data-path).")


def _device(config: Config, context: Context) -> torch.device:
    """A real node may choose its own device (`fedtrain client --device`); otherwise the run's."""
    return resolve_device(str(context.node_config.get("device", config.device)))


def _model_for(config: Config, data: Dataset, arrays: ArrayRecord) -> torch.nn.Module:
    num_classes = config.num_classes or len(config.labels or []) or data.num_classes
    model = build_model(config.model, data.input_shape, num_classes, hidden=config.hidden)
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FedtrainError(
            f"the server's model does not fit this client's model ({first}); both must use the same "
            "model, input shape and classes."
        ) from None
    return model


def _ledger(context: Context, num_samples: int, config: Config) -> PrivacyLedger:
    if LEDGER_KEY in context.state:
        return PrivacyLedger.from_config_record(context.state[LEDGER_KEY])
    return PrivacyLedger(delta=client_delta(num_samples, config.delta), accountant=config.accountant)


def _noise_multiplier(context: Context, config: Config, ledger: PrivacyLedger, rate: float, steps: int) -> float:
    """sigma for this client: fixed, or calibrated once for all planned rounds and kept."""
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if PLAN_KEY in context.state:
        return float(context.state[PLAN_KEY]["noise-multiplier"])
    sigma = calibrate_noise(config.target_epsilon, ledger.delta, rate, steps * config.rounds, ledger.accountant)
    context.state[PLAN_KEY] = ConfigRecord({"noise-multiplier": sigma, "sample-rate": rate})
    return sigma


def _privacy_record(cid: str, ledger: PrivacyLedger, epsilon: float) -> ConfigRecord:
    record = ledger.to_config_record()
    record["client-id"] = cid
    record["epsilon"] = epsilon
    return record


@dataclass(frozen=True)
class LedgerDisk:
    """Where this client keeps its ledger between restarts: its name and the key that seals it."""

    client: str
    key: bytes


def _ledger_disk(context: Context, ledger_key: bytes | None) -> LedgerDisk | None:
    """A real node (it has a kit) seals its ledger with its uplink key; a simulated one with the key
    the simulation gives it (the run's model key); an in-process test node keeps none."""
    if "kit" in context.node_config:
        keys = keys_from_kit(str(context.node_config["kit"]))
        return LedgerDisk(keys.name, keys.uplink)
    return LedgerDisk(client_id(context), ledger_key) if ledger_key is not None else None


def _run_of(msg: Message, context: Context) -> str:
    """fedtrain's run id, which the server sends and keeps across a resume; else Flower's."""
    sent = msg.content.config_records.get("config")
    return str(sent["fedtrain-run"]) if sent is not None and "fedtrain-run" in sent else str(context.run_id)


def _restore_from_disk(context: Context, disk: LedgerDisk | None, run: str) -> None:
    """After a restart, take up the ledger this client stored for this run."""
    if disk is None or LEDGER_KEY in context.state:
        return
    stored = ledger_store.load(disk.client, run, disk.key)
    if stored is not None:
        ledger, plan = stored
        context.state[LEDGER_KEY] = ledger.to_config_record()
        if plan:
            context.state[PLAN_KEY] = ConfigRecord(plan)


def handle_train(msg: Message, context: Context, config: Config, ledger_key: bytes | None = None) -> Message:
    torch.set_num_threads(1)  # simulated clients share the cores; one thread each is fastest
    cid = client_id(context)
    disk, run = _ledger_disk(context, ledger_key), _run_of(msg, context)
    _restore_from_disk(context, disk, run)
    train, _ = client_data(config, context)
    settings = TrainSettings(
        config.batch_size,
        config.local_epochs,
        config.lr,
        config.momentum,
        config.max_grad_norm,
        # a real node may set its own (`fedtrain client --max-physical-batch-size`): its GPU, its memory
        max_physical_batch_size=int(context.node_config.get("max-physical-batch-size", 0))
        or config.max_physical_batch_size,
    )
    ledger = _ledger(context, len(train), config)
    plan = planned_round(len(train), settings, 1.0)
    sigma = _noise_multiplier(context, config, ledger, plan.sample_rate, plan.steps)
    plan = planned_round(len(train), settings, sigma)
    budget = config.effective_max_epsilon
    projected = ledger.epsilon(extra=plan)
    if budget is not None and projected > budget * (1 + 1e-9):
        spent = ledger.epsilon()
        reason = (
            f"{cid} refuses this round: it would raise epsilon from {spent:.3f} to {projected:.3f}, "
            f"over the budget of {budget:g} (delta {ledger.delta:g})"
        )
        log.warning(reason)
        record = _privacy_record(cid, ledger, spent)
        record["refused"] = reason
        return Message(RecordDict({"privacy": record}), reply_to=msg)

    sent = msg.content.config_records.get("config")
    if sent is not None and "proximal-mu" in sent:  # FedProx
        settings = dataclasses.replace(settings, proximal_mu=float(sent["proximal-mu"]))
    global_arrays = msg.content["arrays"]
    model = _model_for(config, train, global_arrays)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = train_round(model, train, settings, sigma, ledger, _device(config, context))
    ledger.record(result.entry)
    context.state[LEDGER_KEY] = ledger.to_config_record()
    if disk is not None:
        plan_record = context.state[PLAN_KEY] if PLAN_KEY in context.state else ConfigRecord()
        ledger_store.save(disk.client, run, disk.key, ledger, dict(plan_record))
    # Opacus counted exactly the planned steps (it always does with Poisson sampling): reuse the projection.
    epsilon = projected if result.entry == plan else ledger.epsilon()
    update = {k: (v.detach().cpu() - start[k]) for k, v in model.state_dict().items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(update),
            "metrics": MetricRecord(
                {"num-examples": result.num_examples, "train-loss": result.loss, "epsilon": epsilon}
            ),
            "privacy": _privacy_record(cid, ledger, epsilon),
        }
    )
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, config: Config) -> Message:
    torch.set_num_threads(1)
    train, held_out = client_data(config, context)
    model = _model_for(config, train, msg.content["arrays"])
    device = _device(config, context)
    loss, accuracy = evaluate(model.to(device), held_out, device) if len(held_out) else (0.0, 0.0)
    metrics = MetricRecord({"num-examples": len(held_out), "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
