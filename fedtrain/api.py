"""fedtrain from Python: `simulate` a federation, `load_model` from a run. The CLI is a thin layer over `run`.

    import fedtrain
    result = fedtrain.simulate(data=(x, y), model=make_model, task="regression", clients=3, rounds=5,
                               target_epsilon=8, target_range=[0, 1])
    result.model(x[:4])        # an nn.Module holding the final weights
    result.history[-1]         # the last round's metrics
    result.privacy["clients"]  # every client's epsilon and full ledger

Everything a bad input can break is checked before anything is created, and raises one
FedtrainError. The call leaves the process as it found it: environment, loggers, Ray shut down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from fedtrain.components import Components, outputs_for
from fedtrain.config import Config, from_mapping, load_toml
from fedtrain.data import ArrayDataset, Dataset, TorchDataset, encode_targets
from fedtrain.errors import FedtrainError
from fedtrain.models import ModelSpec, build_model, model_name
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.security.keys import ModelKey, generate_key, load_model_key, write_key_file
from fedtrain.tasks import Task, build_task

if TYPE_CHECKING:
    from fedtrain.tuning import SearchSpace, TuneResult

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    """What a run leaves: the final model, one dict per round, each client's privacy, where it is.

    `key_file` is the model key's file (a temporary one when `simulate` made it: copy it if you
    need to open `run_dir`'s encrypted files later)."""

    model: nn.Module
    history: list[dict[str, Any]]
    privacy: dict[str, Any]
    run_dir: Path
    key_file: Path | None


def simulate(
    data: str | os.PathLike[str] | Dataset | Any = "digits",
    model: ModelSpec = "logistic",
    task: str | Task = "classification",
    clients: int = 5,
    rounds: int = 30,
    target_epsilon: float | None = 3.0,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    policy: ClientPolicy | None = None,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    **settings: Any,
) -> RunResult:
    """Train on Flower's Simulation Engine: `data` split into `clients` private shards, DP-SGD on each.

    Args:
        data: a path (file or folder, as `fedtrain simulate --data`), a built-in name ("digits"), a
            `torch.utils.data.Dataset` of (features, target) pairs, a fedtrain Dataset, or arrays (x, y).
        model: "logistic", "mlp", "cnn", "MODULE:FACTORY", or a factory returning a `torch.nn.Module`
            (it may take `input_shape` and `num_classes` / `num_outputs` as keywords).
        task: "classification", "regression", "multilabel", "MODULE:NAME", or a `fedtrain.Task`.
        clients: simulated clients.
        rounds: federated rounds.
        target_epsilon: each client's epsilon for the whole run (None with `noise_multiplier=`).
        run_dir: where to keep the run (must be new or empty); default: a new temporary folder.
        key_file: the model key; default: a new key in a temporary folder (see RunResult.key_file).
        policy: a privacy policy every simulated client applies (default: the run's own settings).
        on_round: called with each round's metrics as it ends.
        verbose: show Flower's own log lines.
        **settings: any other option of the config, by its flat key (`lr=0.3`, `batch_size=64`...).

    Returns:
        The RunResult.

    Raises:
        FedtrainError: one sentence for a bad input (wrong dataset type, a factory that fails or
            returns the wrong thing, task outputs of the wrong shape, a non-differentiable loss...).
    """
    with keep_process():
        components, values = _components(data, model, task, settings)
        values.update(clients=clients, rounds=rounds)
        if target_epsilon is None or "noise_multiplier" in settings:
            values.setdefault("target_epsilon", target_epsilon)
        else:
            values["target_epsilon"] = target_epsilon
        if run_dir is not None:
            values["run_dir"] = str(run_dir)
        if key_file is not None:
            values["key_file"] = str(key_file)
        config = from_mapping(values, "fedtrain.simulate's arguments")
        return run(config, components=components, policy=policy, on_round=on_round, verbose=verbose,
                   temporary=True)  # fmt: skip


def tune(
    data: str | os.PathLike[str] | Dataset | Any = "digits",
    model: ModelSpec = "logistic",
    task: str | Task = "classification",
    clients: int = 5,
    rounds: int = 30,
    target_epsilon: float = 3.0,
    *,
    expected_trials: float = 8.0,
    eta: float = 0.0,
    space: SearchSpace | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    policy: ClientPolicy | None = None,
    announce: Callable[[str], None] | None = None,
    rng: np.random.Generator | None = None,
    **settings: Any,
) -> TuneResult:
    """Tune the learning rate and clipping bound privately, in simulation: the best of a secret, random
    number of trials (Papernot and Steinke), each client spending `target_epsilon` on all of it.

    Args:
        data, model, task, clients, rounds: as for `simulate` (rounds: of each trial).
        target_epsilon: each client's epsilon for the whole tuning, training included.
        expected_trials: the mean of the random number of trials.
        eta: the trial count's shape (0 logarithmic, the cheapest; 1 geometric).
        space: the candidates (default: 1/4 to 4 times the learning rate, 1/2 to 2 times the clipping bound).
        run_dir: where to keep the chosen run (must be new or empty); default: a new temporary folder.
        key_file: the model key; default: a new key in a temporary folder.
        policy: a privacy policy every simulated client applies.
        announce: told where the run is and how the tuning goes.
        rng: K's and the candidates' generator, for tests only (K must stay secret).
        **settings: any other option of the config, by its flat key.

    Returns:
        The TuneResult: the best trial's model and history, the candidate chosen, its metric on
        the half of the central test split that chose it and on the unseen half.

    Raises:
        FedtrainError: a bad input, tuning alone over the budget, or a trial that could not run.
    """
    from fedtrain.tuning import tune as run_tuning

    with keep_process():
        components, values = _components(data, model, task, settings)
        values.update(clients=clients, rounds=rounds, target_epsilon=target_epsilon)
        if run_dir is not None:
            values["run_dir"] = str(run_dir)
        if key_file is not None:
            values["key_file"] = str(key_file)
        config = from_mapping(values, "fedtrain.tune's arguments")
        return run_tuning(config, expected_trials=expected_trials, eta=eta, space=space, components=components,
                          policy=policy, temporary=True, announce=announce, rng=rng)  # fmt: skip


def run(
    config: Config,
    *,
    components: Components | None = None,
    policy: ClientPolicy | None = None,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    resume: bool = False,
    temporary: bool = False,
    announce: Callable[[str], None] | None = None,
) -> RunResult:
    """Run a simulation of `config` (what `simulate` and `fedtrain simulate` share).

    The data, model, task, device and strategy are checked first; only then are the run directory
    and the key made. Without a run directory or key in `config`: temporary ones when `temporary`,
    else `runs/<time>` and the local key store (the CLI's way).

    Args:
        config: the run's config.
        components: Python objects in place of names.
        policy: the policy every simulated client applies.
        on_round: called with each round's metrics.
        verbose: Flower's own log lines.
        resume: continue the run in `config.deployment.run_dir` after its last complete round.
        temporary: make a temporary run directory and key when none is given.
        announce: told where the key and the run directory are (the CLI prints it).

    Returns:
        The RunResult.

    Raises:
        FedtrainError: a bad input, or the run stopped.
    """
    from fedtrain import simulation
    from fedtrain.server.checkpoint import preflight

    say = announce or (lambda text: None)
    if config.privacy.tuning_trials is not None:
        raise FedtrainError(
            "the tuning_* settings belong to `fedtrain tune` (a tuned run is final and is not resumed); "
            "remove them, or tune with `fedtrain tune`."
        )
    prepared = simulation.prepare(config, components)  # before a key or a directory exists
    path = _run_dir(config, resume, temporary)
    key = _model_key(config, resume, temporary)
    config = config.replace(run_dir=str(path), key_file=str(key.path) if key.path else None)
    say(f"model key: {key.source} (key id {key.key_id}); keep it to open the model.")
    if resume:
        done = preflight(config)
        say(f"run directory: {path} (resuming after round {done} of {config.federation.rounds})")
    else:
        say(f"run directory: {path}")
    rows = simulation.run(config, on_round=on_round, verbose=verbose, resume=resume, policy=policy,
                          prepared=prepared, components=components)  # fmt: skip
    privacy = json.loads((path / "privacy.json").read_text())
    trained = load_model(path, key.path, model=components.model if components else None, task=_task(components))
    earlier = json.loads((path / "metrics.json").read_text()) if resume else rows
    return RunResult(trained, earlier, privacy, path, key.path)


def load_model(
    run_dir: str | os.PathLike[str],
    key_file: str | os.PathLike[str] | None = None,
    *,
    model: ModelSpec | None = None,
    task: Task | None = None,
) -> nn.Module:
    """The final model of a run, decrypted into a `torch.nn.Module` (nothing plain is written).

    Args:
        run_dir: the run's directory.
        key_file: its model key (default: the run's own key file, $FEDTRAIN_MODEL_KEY, or the store).
        model: the factory, when the run's model was given from Python (its config only names it).
        task: the task object, when the run's task was given from Python.

    Returns:
        The model with the run's final weights.

    Raises:
        FedtrainError: not a finished run, a wrong key, edited or tampered files, an unknown model.
    """
    from fedtrain.server.model_files import MODEL_FILE, read_run_info
    from fedtrain.server.model_files import load_model as open_model
    from fedtrain.server.verification import require_intact_reports

    path = Path(run_dir)
    info = read_run_info(path)
    config = _run_config(path)
    key = load_model_key(str(key_file) if key_file else config.deployment.key_file)
    if not (path / MODEL_FILE).exists():
        raise FedtrainError(f"{path} holds no final model: the run did not finish (resume it to finish it).")
    state, _ = open_model(path / MODEL_FILE, key.key, info["run_id"], "model")
    require_intact_reports(path, key)
    spec = model if model is not None else config.training.model
    if isinstance(spec, str) and spec.startswith("python:"):
        raise FedtrainError(f"{path}'s model was given from Python ({spec}); pass model= the same factory.")
    chosen = task or (None if config.training.task.startswith("python:") else build_task(config.training.task))
    if chosen is None:
        raise FedtrainError(f"{path}'s task was given from Python; pass task= the same Task.")
    assert config.data.input_shape is not None
    built = build_model(spec, config.data.input_shape, outputs_for(config, chosen), hidden=config.training.hidden)
    try:
        built.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FedtrainError(
            f"the model given does not fit the run's weights ({first}); give the run's own model."
        ) from None
    return built.eval()


# ---------------------------------------------------------------- helpers


def _task(components: Components | None) -> Task | None:
    return components.task if components is not None else None


def _run_config(path: Path) -> Config:
    values = load_toml(path / "config.toml")
    return from_mapping(values, str(path / "config.toml"))


def _run_dir(config: Config, resume: bool, temporary: bool) -> Path:
    given = config.deployment.run_dir
    if resume:
        assert given is not None
        return Path(given)
    if given is None and temporary:
        return Path(tempfile.mkdtemp(prefix="fedtrain-run-"))
    from time import strftime

    path = Path(given) if given else Path("runs") / strftime("%Y%m%d-%H%M%S")
    if path.exists() and any(path.iterdir()):
        raise FedtrainError(f"run directory {path} is not empty; choose a new --run-dir so no earlier run is lost.")
    return path


def _model_key(config: Config, resume: bool, temporary: bool) -> ModelKey:
    given = config.deployment.key_file
    if given is None and temporary and not os.environ.get("FEDTRAIN_MODEL_KEY"):
        folder = Path(tempfile.mkdtemp(prefix="fedtrain-key-"))  # never beside the model
        return load_model_key(str(write_key_file(folder / "model.key", generate_key())))
    return load_model_key(given, create_local=not resume)


def _components(data: Any, model: ModelSpec, task: str | Task, settings: dict[str, Any]) -> tuple[Components, dict]:
    """Python objects out of the arguments, and the flat config values that name them."""
    values = dict(settings)
    task_object = task if isinstance(task, Task) else None
    if isinstance(task, Task):
        values["task"] = f"python:{type(task).__module__}.{type(task).__qualname__}"
    elif isinstance(task, str):
        values["task"] = task
    else:
        raise FedtrainError(f"task must be a name or a fedtrain.Task, not {type(task).__name__}.")
    resolved_task = task_object or build_task(values["task"], values.get("target_range"))
    if not (isinstance(model, str) or callable(model)):
        raise FedtrainError(
            f"model must be a name or a factory returning a torch.nn.Module, not {type(model).__name__}."
        )
    values["model"] = model_name(model)
    dataset = _dataset(data, resolved_task, values)
    if dataset is not None:
        values["data"] = f"python:{type(data).__name__}"
    elif isinstance(data, (str, os.PathLike)):
        values["data"] = str(data)
    factory = model if callable(model) else None
    return Components(model=factory, task=task_object, dataset=dataset), values


def _dataset(data: Any, task: Task, values: dict[str, Any]) -> Dataset | None:
    """A fedtrain Dataset for data given as an object; None for a path or a built-in name."""
    if isinstance(data, (str, os.PathLike)):
        return None
    if isinstance(data, Dataset):
        return data
    config = from_mapping({k: v for k, v in values.items() if k in ("labels", "num_classes")}, "the arguments")
    infer = not config.data.labels
    if isinstance(data, tuple) and len(data) == 2:
        x, y = (np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for a in data)
        if len(x) != len(y) or len(x) == 0:
            raise FedtrainError(f"data (x, y) must hold as many targets as samples (got {len(x)} and {len(y)}).")
        if not np.issubdtype(x.dtype, np.number) or (np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all()):
            raise FedtrainError("data x must be finite numbers; clean it first.")
        targets, names = encode_targets(y, config, "data", infer, task.target_kind)
        return ArrayDataset(x, targets, names)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise FedtrainError("the dataset given is empty; give one with at least one example per client.")
        try:
            raw = np.asarray([_as_array(data[i][1]) for i in range(len(data))])
        except Exception as exc:
            raise FedtrainError(
                f"the dataset's items must be (features, target) pairs ({type(exc).__name__}: {exc})."
            ) from None
        targets, names = encode_targets(raw, config, "the dataset", infer, task.target_kind)
        return TorchDataset(data, targets, names)
    raise FedtrainError(
        f"data must be a path, a built-in name, a torch Dataset or arrays (x, y), not {type(data).__name__}."
    )


def _as_array(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


@contextlib.contextmanager
def keep_process() -> Iterator[None]:
    """Leave the process as it was: the environment, the loggers' levels and handlers, and Ray (shut
    down if this call started it)."""
    environment = dict(os.environ)
    known = list(logging.Logger.manager.loggerDict.items())
    loggers = {
        name: (item.level, list(item.handlers), item.propagate)
        for name, item in known
        if isinstance(item, logging.Logger)
    }
    root = (logging.getLogger().level, list(logging.getLogger().handlers))
    ray_before = _ray_running()
    try:
        yield
    finally:
        if not ray_before and _ray_running():
            import ray

            ray.shutdown()
        os.environ.clear()
        os.environ.update(environment)
        for name, (level, handlers, propagate) in loggers.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        logging.getLogger().setLevel(root[0])
        logging.getLogger().handlers[:] = root[1]


def _ray_running() -> bool:
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    return bool(ray.is_initialized())


__all__ = ["RunResult", "keep_process", "load_model", "run", "simulate", "tune"]
