"""Run fedtrain's ServerApp and ClientApp on Flower's Simulation Engine (Ray), in this process.

Everything that can be wrong with the data, the model or the device is checked here *before*
Ray starts, so a bad input fails in a second with one clear sentence instead of N client errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context

from fedtrain._flower import indexed_message_state
from fedtrain.clients.app import build_client_app
from fedtrain.clients.encryption_mod import ClientKeys
from fedtrain.components import Components, model_for, outputs_for, task_for
from fedtrain.config import Config
from fedtrain.data import Dataset, load_source
from fedtrain.data.partition import simulation_client_split, simulation_shard, simulation_test_set
from fedtrain.device import resolve_device
from fedtrain.errors import FedtrainError
from fedtrain.local_ray import start_ray
from fedtrain.models import build_model
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.security.keys import generate_key, load_model_key
from fedtrain.security.payload import PayloadKeys
from fedtrain.server.app import build_server_app
from fedtrain.server.loop import RoundCallback
from fedtrain.server.model_files import MODEL_FILE
from fedtrain.strategies import make_strategy
from fedtrain.tasks import Task


def prepare(config: Config, components: Components | None = None) -> tuple[Config, Dataset]:
    """Resolve what the data decides (classes or outputs, input shape) and validate every shard, the
    model and the task on it, before anything starts.

    Args:
        config: the run's config.
        components: Python objects given in place of names (fedtrain.simulate), or None.

    Returns:
        The completed config (every client numbers labels the same way) and the global test set.

    Raises:
        FedtrainError: one sentence for the first problem found.
    """
    task = task_for(config, components)
    source = components.dataset if components is not None and components.dataset is not None else None
    source = source or load_source(config, task.target_kind)
    if len(source) == 0:
        raise FedtrainError("the dataset holds no samples; give one with at least one example per client.")
    config = config.replace(input_shape=source.input_shape, **_described_outputs(config, source, task))
    shards = [simulation_shard(config, pid, source) for pid in range(config.federation.clients)]
    for pid, shard in enumerate(shards):
        if len(shard) < 2:
            raise FedtrainError(f"client {pid} would get {len(shard)} samples; use fewer clients or more data.")
    device = resolve_device(config.training.device)
    model = build_model(model_for(config, components), source.input_shape, outputs_for(config, task),
                        hidden=config.training.hidden)  # fmt: skip
    _check_task(model, shards[0], task)
    _preflight(config, model, simulation_client_split(config, 0, source, task.target_kind)[0], task, device)
    make_strategy(config)  # its name and parameters
    return config, simulation_test_set(config, source)


def _preflight(config: Config, model: torch.nn.Module, train: Dataset, task: Task, device: torch.device) -> None:
    """The DP preflight every client runs before its first step (privacy/preflight.py), once here on the
    first client's split: a model, loss or loader that would break the guarantee stops the run before Ray
    starts. The noise a target epsilon calibrates is each client's to check; 1.0 stands in for it here."""
    from fedtrain import training_defaults
    from fedtrain.clients.trainer import TrainSettings, planned_round, private_training
    from fedtrain.privacy import preflight
    from fedtrain.privacy.ledger import PrivacyLedger

    # values left to the rules: the largest batch they allow stands in for the client's (the checks are
    # of the model, loss and loader, not of the batch size)
    local = training_defaults.resolve(config, len(train))
    settings = TrainSettings(local.batch_size, local.local_epochs, local.lr, config.training.momentum,
                             local.max_grad_norm)  # fmt: skip
    noise = config.privacy.noise_multiplier or 1.0
    setup = private_training(model, train, settings, noise, PrivacyLedger(delta=1e-5), device, task).setup
    reason = preflight.refusal(setup, planned_round(len(train), settings, noise), len(train), local.batch_size,
                               preflight.probe_batch(train, device))  # fmt: skip
    if reason is not None:
        raise preflight.PreflightRefusal(f"the DP preflight refuses this run: {reason}.")


def _described_outputs(config: Config, source: Dataset, task: Task) -> dict[str, Any]:
    """The classes (classification), labels (multilabel) or target values (regression) the data has."""
    if task.target_kind == "classes":
        names = config.data.labels or source.class_names
        if not names:
            raise FedtrainError("a classification task needs class labels; the dataset gave none.")
        return {"labels": list(names), "num_classes": len(names)}
    targets = source.targets()
    width = int(targets.shape[1]) if targets.ndim > 1 else 1
    if task.name == "multilabel":
        return {"num_classes": config.data.num_classes or width}
    return {"num_outputs": config.data.num_outputs or width}


def _check_task(model: torch.nn.Module, shard: Dataset, task: Task) -> None:
    """The task's loss on the model's outputs for two real samples: right shapes, differentiable."""
    x, y = shard.batch(np.arange(min(2, len(shard))))
    model.train()
    task.check(model(torch.from_numpy(x)), torch.from_numpy(np.asarray(y)))


_RAY_TOKEN: str | None = None  # set once, before Ray is first imported


def ray_local_only() -> None:
    """Keep Ray to this machine and this user's processes: every port on 127.0.0.1, every call
    authenticated with a token only this process and its children hold. Call before Ray starts.

    `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: on Linux Ray swaps a loopback address
    for the machine's routable one (`ray._private.services.resolve_ip_for_localhost`), then binds its
    GCS, raylet, driver and workers on every interface and its runtime-env agent on that address. Ray's
    local-only mode (its default on macOS and Windows) keeps loopback. On loopback, Ray still answers
    any local user (node list, key-value store, tasks) unless token authentication is on; Ray reads
    that setting once, at import, so a process that imported Ray before gets loopback only.
    """
    global _RAY_TOKEN
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for every process Ray starts
    if "ray" not in sys.modules and _RAY_TOKEN is None:  # Ray fixes its authentication mode when first imported
        _RAY_TOKEN = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    if _RAY_TOKEN is not None:
        # One token per process, inherited by every Ray process; a later simulation here reuses it (the
        # Python API puts the caller's environment back after each call: the token lives here meanwhile).
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = _RAY_TOKEN
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read once at import, maybe before the first line


def backend_config(config: Config, ray_dir: str) -> dict[str, Any]:
    """Ray on this machine only, one CPU per simulated client, quiet, its files in `ray_dir`.

    Every Ray port is on 127.0.0.1 only once `ray_local_only()` has run."""
    cpus = max(1, min(os.cpu_count() or 1, config.federation.clients))
    gpu_count = 0
    if resolve_device(config.training.device).type == "cuda":
        import torch

        gpu_count = torch.cuda.device_count()
    return {
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": gpu_count,
            "_temp_dir": ray_dir,
            "_node_ip_address": "127.0.0.1",
            "log_to_driver": False,
            "logging_level": "error",
            "include_dashboard": False,
        },
        # clients share the GPUs evenly, one CPU each
        "client_resources": {"num_cpus": 1, "num_gpus": min(1.0, gpu_count / cpus) if gpu_count else 0.0},
    }


def _simulation_keys(config: Config) -> tuple[PayloadKeys, Callable[[Context], ClientKeys]]:
    """Fresh in-memory payload keys for one simulated federation: never written to disk."""
    federation = generate_key()
    uplink = {f"client-{pid}": generate_key() for pid in range(config.federation.clients)}

    def keys_for(context: Context) -> ClientKeys:
        name = f"client-{int(context.node_config['partition-id'])}"
        return ClientKeys(name, federation, uplink[name])

    return PayloadKeys(federation, uplink), keys_for


@contextlib.contextmanager
def _quiet_flower(verbose: bool) -> Iterator[None]:
    """Keep Flower's own log (per-round lines, deprecation notice, client tracebacks) off the console:
    fedtrain reports every client failure with its reason in the round table and metrics.json."""
    logger = logging.getLogger("flwr")
    previous = logger.level
    if not verbose:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(previous)


def run(
    config: Config,
    *,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
    policy: ClientPolicy | None = None,
    prepared: tuple[Config, Dataset] | None = None,
    components: Components | None = None,
    ledger_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Prepare, then run the whole federated training (or, with `resume`, its remaining rounds);
    returns the metrics history (one row per round, the resumed ones included). Every simulated
    client applies `policy`, or by default a policy admitting the run's own settings.

    `prepared` is what `prepare` returned for this config, when the caller checked the inputs first
    (the CLI does, before it creates a key or names a run directory): the data is not loaded twice.
    `ledger_dir` keeps the clients' sealed ledgers elsewhere than RUN_DIR/ledgers (a tuning's trials
    share one)."""
    ray_local_only()
    from flwr.simulation import run_simulation

    described, test_set = prepared if prepared is not None else prepare(config, components)
    config = config.replace(
        labels=described.data.labels,
        num_classes=described.data.num_classes,
        num_outputs=described.data.num_outputs,
        input_shape=described.data.input_shape,
    )
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_round is not None:
            on_round(row)

    payload_keys, keys_for = _simulation_keys(config) if config.deployment.payload_encryption else (None, None)
    server_app = build_server_app(
        config, test_set=test_set, on_round=record, payload_keys=payload_keys, resume=resume, components=components
    )
    # Simulated clients keep their ledgers sealed under the run's model key in the run directory, so a
    # resume continues them.
    client_app = build_client_app(
        config,
        keys_for=keys_for,
        ledger_key=load_model_key(config.deployment.key_file).key,
        policy=policy,
        components=components,
        ledger_dir=ledger_dir,
    )
    ray_dir = tempfile.mkdtemp(prefix="ftray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers at nice 15; here the simulated clients ARE the work, and beside any other busy
    # process they got a few percent of a core (a make test beside two CPU hogs crawled). Same priority:
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    backend = backend_config(config, ray_dir)
    try:
        # Flower's message store, indexed per node: unindexed, 1000 clients all training never finish a round
        with _quiet_flower(verbose), indexed_message_state():
            # Flower's backend starts Ray only when none runs: start it here, retried on a busy machine
            start_ray(backend["init_args"])
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.federation.clients,
                backend_config=backend,
            )
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts Ray down when it ends normally, not when it fails to start
            ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    if not (Path(str(config.deployment.run_dir)) / MODEL_FILE).exists():  # Flower logs a ServerApp's error and returns
        last = rows[-1]["round"] if rows else "no"
        raise FedtrainError(
            f"the simulation stopped after {last} round(s) of {config.federation.rounds}; see the log above."
        )
    return rows
