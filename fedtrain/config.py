"""One typed configuration for a fedtrain run, in sections.

    data        what the data is and how a simulation splits it
    federation  who takes part and how rounds run (population, rounds, sampling, waits, SecAgg+)
    strategy    how updates are aggregated (docs/strategies.md)
    privacy     sample-level DP on the clients, metrics, client-level DP on the server
    training    the model and local DP-SGD
    deployment  where the run lives and how it reaches its keys (never a key itself)

Every field has one *flat key*, its own name (two exceptions: `data` is data.source and `strategy`
is strategy.name), which is what the command line, a TOML file's top level and Flower's run_config
use; a TOML file may also give sections ([privacy] target_epsilon = 3). Sources, later ones
winning: built-in defaults < TOML file < command-line options. Values are coerced and checked from
the fields' type hints (option sets are `Literal`s); the config is flattened only at Flower's
run_config boundary (`to_run_config` / `from_run_config`).

`federation.clients` is the federation's population: the simulated clients, or in a deployment the
clients the server's kit was provisioned for. How many must be online before a round starts is
`min_available_clients` (`fedtrain server --min-clients`), never the population.
"""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from fedtrain.errors import FedtrainError
from fedtrain.fileio import read_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Partition = Literal["iid", "dirichlet"]
Accountant = Literal["prv", "rdp"]
CentralDP = Literal["off", "fixed", "adaptive"]
MetricsMode = Literal["none", "private", "plain"]  # ordered: how much a client releases about its data
UpdateCompression = Literal["none", "int8", "int4", "topk"]  # fedtrain/compression.py
GradSampleMode = Literal["auto", "hooks", "ew", "functorch", "ghost"]  # fedtrain/clients/grad_sample_mode.py
Precision = Literal["fp32", "bf16"]
PARTITIONS: tuple[str, ...] = get_args(Partition)
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
CENTRAL_DP_MODES: tuple[str, ...] = get_args(CentralDP)
METRICS_MODES: tuple[str, ...] = get_args(MetricsMode)
TRACK_TARGETS = ("mlflow", "tensorboard")  # where `track` may log a run (server/tracking/)


@dataclass
class DataConfig:
    source: str = "digits"  # flat key `data`: a file, an image folder, or a built-in name
    label_column: str = "label"
    labels: list[str] | None = None
    num_classes: int | None = None
    input_shape: list[int] | None = None
    eval_fraction: float = 0.05  # of each client's shard, held out for federated evaluation
    test_fraction: float = 0.1  # simulation: of the dataset, the server's central test split
    partition: Partition = "iid"  # simulation: how the dataset is split into shards
    alpha: float = 0.5  # Dirichlet concentration (smaller: more label skew)
    image_size: list[int] | None = None  # image folders: resize every image to [height, width]
    num_outputs: int | None = None  # regression: target values per sample (unset: from the data, else 1)
    target_range: list[float] | None = None  # regression: the targets' public range [low, high]


@dataclass
class FederationConfig:
    clients: int = 5  # the population: simulated clients, or the clients a deployment was provisioned for
    rounds: int = 30
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_fit_clients: int = 1  # a round whose usable updates are fewer stops the run, keeping the last model
    min_available_clients: int | None = None  # clients online before a round starts (unset: min_fit_clients)
    round_timeout: float = 600.0
    # secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates
    secure_aggregation: bool = False
    secagg_update_bound: float = 10.0  # clients scale updates to this L2 norm; quantisation range [-R, R]
    secagg_threshold: float = 0.6  # share of a client's shares needed to unmask it if it drops out
    # updates sent compressed (after DP-SGD: post-processing, no privacy cost; error feedback on the client)
    compression: UpdateCompression = "none"
    compression_block: int = 256  # values per quantisation scale; 0: one scale per tensor
    topk_fraction: float = 0.1  # top-k: the share of an update's values sent
    seed: int = 0  # splits, the initial model, the clients each round samples


@dataclass
class StrategyConfig:
    name: str = "fedavg"  # flat key `strategy`
    max_update_norm: float | None = None  # an update d with ||d||_2 above this is rejected before aggregation
    server_lr: float | None = None  # unset: 0.1 for the FedOpt family, 1.0 for fedavgm
    server_momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.0
    num_malicious: int = 0
    num_selected: int | None = None
    trim_beta: float = 0.2


@dataclass
class PrivacyConfig:
    # sample-level DP, per client (each client's own policy has the last word: docs/privacy.md)
    target_epsilon: float | None = 3.0
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None  # unset: chosen by rule on each client (fedtrain/training_defaults.py)
    max_grad_norm_scale: float = 1.0  # multiplies the rule's clipping bound (`fedtrain tune`'s search; unset only)
    delta: float | None = None
    max_epsilon: float | None = None
    accountant: Accountant = "prv"
    # metrics computed on private data: private (Gaussian mechanism, on the ledger), none, or plain (exact:
    # outside the guarantee, said in words in privacy.json and the CLI)
    metrics: MetricsMode = "private"
    # client-level (central) DP on the server: clip each update, noise the mean (docs/strategies.md)
    central_dp: CentralDP = "off"
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0  # the bound (fixed) or its starting value (adaptive)
    central_target_quantile: float = 0.5  # adaptive: share of updates meant to fall under the bound
    central_clip_lr: float = 0.2  # adaptive: how fast the bound follows that quantile
    central_delta: float | None = None  # unset: 1e-5, or 1 / (10 * clients) if smaller
    max_client_epsilon: float | None = None  # a run whose planned rounds would exceed it does not start
    # a trial of a private hyperparameter tuning (`fedtrain tune` sets these; privacy/tuning.py): the
    # expected number of trials, the trial count's eta, and the tuning every trial belongs to
    tuning_trials: float | None = None
    tuning_eta: float = 0.0
    tuning_id: str | None = None


@dataclass
class TrainingConfig:
    model: str = "logistic"
    task: str = "classification"  # classification, regression, multilabel, or MODULE:NAME (fedtrain/tasks.py)
    hidden: int = 32
    # Unset (None): each client chooses them by rule from its number of examples, the model family and
    # the run's epsilon (fedtrain/training_defaults.py, docs/privacy.md); a value given here is used as given.
    lr: float | None = None
    lr_scale: float = 1.0  # multiplies the rule's learning rate (`fedtrain tune`'s search; when lr is unset)
    momentum: float = 0.0
    batch_size: int | None = None
    local_epochs: int | None = None
    max_physical_batch_size: int | None = None  # GPU memory: compute a batch in chunks of this size
    device: str = "auto"
    # per-sample gradients: auto (the fastest mode that matches hooks; ghost clipping when they would not
    # fit in grad_sample_memory_mib, unset: a quarter of the device's memory) or one Opacus mode
    grad_sample_mode: GradSampleMode = "auto"
    grad_sample_memory_mib: float | None = None
    precision: Precision = "fp32"  # bf16: forward under autocast, per-sample gradients clipped in float32


@dataclass
class DeploymentConfig:
    payload_encryption: bool = False
    kit: str | None = None
    run_dir: str | None = None
    key_file: str | None = None  # the *path* of the model key, never a key
    track: list[str] | None = None  # also log every round to: mlflow, tensorboard (server/tracking/)
    mlflow_uri: str | None = None  # MLflow's store: a folder (unset: ./mlruns) or an MLflow tracking URI


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "federation": FederationConfig,
    "strategy": StrategyConfig,
    "privacy": PrivacyConfig,
    "training": TrainingConfig,
    "deployment": DeploymentConfig,
}
_ALIASES = {("data", "source"): "data", ("strategy", "name"): "strategy"}
# flat key -> (section, field), and each field's type hint
FLAT: dict[str, tuple[str, str]] = {
    _ALIASES.get((section, f.name), f.name): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
}
_HINTS: dict[tuple[str, str], Any] = {
    (section, name): hint for section, cls in SECTIONS.items() for name, hint in get_type_hints(cls).items()
}
_DEFAULTS: dict[str, Any] = {key: getattr(SECTIONS[s](), f) for key, (s, f) in FLAT.items()}


class Config:
    """Every option of a run, in sections. Build it from flat keys: `Config(rounds=5, lr=0.3)`.

    Sections are attributes (`config.privacy.target_epsilon`); `extra` keeps run_config keys that
    belong to other components (e.g. `fedtrain-resume`)."""

    data: DataConfig
    federation: FederationConfig
    strategy: StrategyConfig
    privacy: PrivacyConfig
    training: TrainingConfig
    deployment: DeploymentConfig

    def __init__(self, extra: dict[str, Any] | None = None, **flat: Any) -> None:
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise FedtrainError(f"unknown option {unknown[0]!r}; valid options are: {', '.join(sorted(FLAT))}.")
        for section, cls in SECTIONS.items():
            setattr(self, section, cls())
        if flat.get("noise_multiplier") is not None and "target_epsilon" not in flat:
            flat = {**flat, "target_epsilon": None}  # a fixed sigma replaces the default target
        for key, value in flat.items():
            section, name = FLAT[key]
            setattr(getattr(self, section), name, value)
        self.extra: dict[str, Any] = dict(extra or {})

    # ---------------------------------------------------------------- flat access

    def value(self, key: str) -> Any:
        """The value of a flat key (`config.value("rounds")`)."""
        section, name = FLAT[key]
        return getattr(getattr(self, section), name)

    def flat(self) -> dict[str, Any]:
        """Every flat key with its value (None included)."""
        return {key: self.value(key) for key in FLAT}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.flat() == other.flat() and self.extra == other.extra

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.flat().items() if v != _DEFAULTS[k]}
        return f"Config({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` (flat keys; None values are ignored) applied and validated."""
        given = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(given) - set(FLAT) - {"extra"})
        if unknown:
            raise FedtrainError(f"unknown option {unknown[0]!r}; valid options are: {', '.join(sorted(FLAT))}.")
        copy = Config(extra=given.pop("extra", self.extra))
        for key, value in {**self.flat(), **given}.items():
            section, name = FLAT[key]
            setattr(getattr(copy, section), name, value)
        return copy.validate()

    # ---------------------------------------------------------------- derived values

    @property
    def effective_central_delta(self) -> float:
        """delta for client-level DP: well below 1 / clients, the population it protects."""
        given = self.privacy.central_delta
        return given if given is not None else min(1e-5, 1 / (10 * self.federation.clients))

    @property
    def clients_to_wait_for(self) -> int:
        """Clients that must be online before a round starts."""
        return max(self.federation.min_fit_clients, self.federation.min_available_clients or 0)

    @property
    def effective_max_epsilon(self) -> float | None:
        """The budget a client refuses to exceed: max_epsilon, else the target epsilon."""
        given = self.privacy.max_epsilon
        return given if given is not None else self.privacy.target_epsilon

    # ---------------------------------------------------------------- checks

    def validate(self) -> Config:
        """Check every value; raise FedtrainError naming the first bad one."""
        for key in FLAT:
            _coerce_in_place(self, key, "the config")
        data, fed, strategy, privacy, training = self.data, self.federation, self.strategy, self.privacy, self.training
        _positive_int(fed, "clients", "rounds", "min_fit_clients")
        auto = [n for n in ("batch_size", "local_epochs") if getattr(training, n) is None]  # chosen by rule
        _positive_int(training, "hidden", *[n for n in ("batch_size", "local_epochs") if n not in auto])
        for name in ("min_fit_clients", "min_available_clients"):
            value = getattr(fed, name)
            if value is not None and not 1 <= value <= fed.clients:
                raise FedtrainError(f"{name} must be between 1 and clients ({fed.clients}), not {value}.")
        _in_range(data, "eval_fraction", 0.0, 0.9)
        _in_range(data, "test_fraction", 0.0, 0.9)
        _in_range(fed, "fraction_train", 0.0, 1.0, low_open=True)
        _in_range(fed, "fraction_evaluate", 0.0, 1.0)
        _in_range(training, "momentum", 0.0, 1.0, high_open=True)
        _positive(data, "alpha")
        _positive(training, "lr_scale", *[n for n in ("lr",) if training.lr is not None])
        _positive(privacy, "max_grad_norm_scale", *[n for n in ("max_grad_norm",) if privacy.max_grad_norm is not None])
        _positive(fed, "round_timeout")
        _positive(strategy, "tau")
        _positive(strategy, *[n for n in ("server_lr", "max_update_norm") if getattr(strategy, n) is not None])
        for name in ("server_momentum", "beta_1", "beta_2"):
            _in_range(strategy, name, 0.0, 1.0, high_open=True)
        if strategy.proximal_mu < 0 or strategy.num_malicious < 0:
            raise FedtrainError("proximal_mu and num_malicious must not be negative.")
        self._validate_privacy()
        if training.max_physical_batch_size is not None:
            _positive_int(training, "max_physical_batch_size")
        if training.grad_sample_memory_mib is not None:
            _positive(training, "grad_sample_memory_mib")
        if training.grad_sample_mode == "ghost" and training.precision != "fp32":
            raise FedtrainError(
                f"grad_sample_mode = ghost cannot be used with precision = {training.precision}: its half-precision "
                "norms could let a clipped gradient exceed max_grad_norm; use precision = fp32 or another mode."
            )
        if data.num_classes is not None and data.num_classes < 2:
            raise FedtrainError(f"num_classes must be at least 2, not {data.num_classes}.")
        if data.labels is not None and len(set(data.labels)) != len(data.labels):
            raise FedtrainError("labels must not repeat a name; list every class once.")
        if data.labels is not None and data.num_classes not in (None, len(data.labels)):
            raise FedtrainError(
                f"num_classes is {data.num_classes} but labels lists {len(data.labels)} classes; "
                "make them agree or drop num_classes."
            )
        if data.input_shape is not None and (not data.input_shape or any(int(d) < 1 for d in data.input_shape)):
            raise FedtrainError(f"input_shape must be positive sizes, not {data.input_shape}.")
        if data.image_size is not None and (len(data.image_size) != 2 or min(data.image_size) < 1):
            raise FedtrainError(f"image_size must be [height, width], two positive sizes, not {data.image_size}.")
        if data.num_outputs is not None and data.num_outputs < 1:
            raise FedtrainError(f"num_outputs must be at least 1, not {data.num_outputs}.")
        if data.target_range is not None and (
            len(data.target_range) != 2 or not data.target_range[0] < data.target_range[1]
        ):
            raise FedtrainError(f"target_range must be [low, high] with low < high, not {data.target_range}.")
        _positive(fed, "secagg_update_bound")
        _in_range(fed, "secagg_threshold", 0.0, 1.0, low_open=True)
        for target in self.deployment.track or []:
            if target not in TRACK_TARGETS:
                raise FedtrainError(f"track must name {' or '.join(TRACK_TARGETS)}, not {target!r}.")
        self._validate_compression()
        return self

    def _validate_compression(self) -> None:
        from fedtrain.compression import Compression

        fed = self.federation
        compression = Compression(fed.compression, fed.compression_block, fed.topk_fraction)  # checks each value
        if fed.secure_aggregation and not compression.sums_exactly:
            raise FedtrainError(
                f"compression = {fed.compression} cannot be used with secure_aggregation: each client quantises "
                "with its own scales, so the masked sum of what they send is not the sum of their updates; use "
                'compression = "topk" or "none".'
            )

    def _validate_privacy(self) -> None:
        privacy = self.privacy
        if privacy.target_epsilon is not None and privacy.noise_multiplier is not None:
            raise FedtrainError(
                "give either target_epsilon or noise_multiplier, not both: "
                "one decides the other for the whole training."
            )
        if privacy.target_epsilon is None and privacy.noise_multiplier is None:
            raise FedtrainError(
                "differential privacy needs target_epsilon or noise_multiplier; "
                "set one of them (for example target_epsilon = 3.0)."
            )
        optional = ("target_epsilon", "max_epsilon", "noise_multiplier", "max_client_epsilon")
        _positive(privacy, *[n for n in optional if getattr(privacy, n) is not None])
        for name in ("delta", "central_delta"):
            if getattr(privacy, name) is not None:
                _in_range(privacy, name, 0.0, 1.0, low_open=True, high_open=True)
        _positive(privacy, "central_noise_multiplier", "central_clipping_norm", "central_clip_lr")
        _in_range(privacy, "central_target_quantile", 0.0, 1.0)
        if privacy.tuning_trials is not None:
            self._validate_tuning()

    def _validate_tuning(self) -> None:
        privacy = self.privacy
        from fedtrain.privacy.tuning import TrialCount

        TrialCount.with_mean(float(privacy.tuning_trials or 0), privacy.tuning_eta)  # in range, or one sentence
        if privacy.target_epsilon is None or not privacy.tuning_id:
            raise FedtrainError("a tuning's trial needs target_epsilon and a tuning_id; run it with `fedtrain tune`.")
        if privacy.metrics != "none":
            raise FedtrainError(
                'a tuning\'s trials release no metrics computed on private data (metrics = "none"): only the '
                "best trial may leave."
            )

    # ---------------------------------------------------------------- Flower run_config (flat, dashed)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flatten to Flower's run_config: dashed flat keys, None left out, lists as JSON."""
        out: dict[str, str | int | float | bool] = {}
        for key, value in self.flat().items():
            if value is not None:
                out[key.replace("_", "-")] = json.dumps(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Config:
        """Inverse of `to_run_config`; unknown keys are kept in `extra` for other components."""
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in FLAT:
                values[name] = json.loads(value) if _is_list(name) and isinstance(value, str) else value
            else:
                extra[key] = value
        return from_mapping(values, "the run config").replace(extra=extra or None)

    def to_toml(self) -> str:
        """Serialise the resolved config as TOML, one table per section (None values are omitted)."""
        lines = ["# fedtrain resolved configuration"]
        for section, cls in SECTIONS.items():
            lines.append(f"\n[{section}]")
            for f in fields(cls):
                value = getattr(getattr(self, section), f.name)
                if value is not None:
                    lines.append(f"{f.name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def _is_list(key: str) -> bool:
    return _base(_HINTS[FLAT[key]])[0] is list


def _base(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None is allowed)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return (get_origin(args[0]) or args[0]), True
    return (origin or hint), False


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _coerce(key: str, value: Any, source: str) -> Any:
    """Convert one raw value to its field's type (from the field's hint), or raise one sentence."""
    hint = _HINTS[FLAT[key]]
    kind, optional = _base(hint)
    if value is None and optional:
        return None
    literal = get_args(hint) if get_origin(hint) is Literal else ()
    try:
        if literal:
            if value not in literal:
                raise FedtrainError(f"{key} must be one of {', '.join(literal)}, not {value!r}.")
            return value
        if kind is list:
            item = get_args(next(a for a in get_args(hint) if a is not type(None)))[0]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if item is int:
                return [int(v) for v in value]
            if item is float:
                return [float(v) for v in value]
            return [str(v) for v in value]
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise TypeError
            return number
        if kind is str:
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        wanted = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", list: "a list"}
        raise FedtrainError(f"{key} in {source} must be {wanted.get(kind, 'a value')}, not {value!r}.") from None
    return value


def _coerce_in_place(config: Config, key: str, source: str) -> None:
    section, name = FLAT[key]
    setattr(getattr(config, section), name, _coerce(key, config.value(key), source))


def from_mapping(values: dict[str, Any], source: str) -> Config:
    """Build a validated Config from flat keys (a TOML file's top level, run_config...).

    A value of None means "unset" and overrides a default (e.g. target_epsilon = None).
    """
    unknown = sorted(set(values) - set(FLAT))
    if unknown:
        raise FedtrainError(f"unknown option {unknown[0]!r} in {source}; valid options are: {', '.join(sorted(FLAT))}.")
    coerced = {k: _coerce(k, v, source) for k, v in values.items()}
    config = Config(**{k: v for k, v in coerced.items() if v is not None})
    for key in (k for k, v in coerced.items() if v is None):
        section, name = FLAT[key]
        setattr(getattr(config, section), name, None)
    return config.validate()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into flat keys: top-level keys (dashes or underscores), or tables named
    after the sections ([privacy] target_epsilon = 3) holding their fields."""
    path = Path(path)
    raw = read_bytes(path, "config file", "check the path")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FedtrainError(f"config file {path} is not valid TOML ({exc}); fix the syntax.") from None
    table = table.get("fedtrain", table) if isinstance(table.get("fedtrain"), dict) else table
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise FedtrainError(
                    f"config file {path} has a section [{key}]; sections are {', '.join(SECTIONS)} (or plain "
                    "top-level keys)."
                )
            names = {f.name for f in fields(SECTIONS[key])}
            for name, item in value.items():
                field_name = name.replace("-", "_")
                if field_name not in names:
                    raise FedtrainError(
                        f"config file {path} has no option {name!r} in [{key}]; it holds: {', '.join(sorted(names))}."
                    )
                flat[_ALIASES.get((key, field_name), field_name)] = item
        else:
            flat[key.replace("-", "_")] = value
    return flat


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults < TOML file < CLI overrides (an override of None means 'not given')."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    # The two DP knobs exclude each other: choosing one (file or CLI) switches off the other.
    if "noise_multiplier" in given:
        values["target_epsilon"] = None
    elif "target_epsilon" in given:
        values["noise_multiplier"] = None
    values.update(given)
    return from_mapping(values, str(config_file) if config_file else "the command line")


def _positive_int(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value < 1:
            raise FedtrainError(f"{name} must be at least 1, not {value}.")


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise FedtrainError(f"{name} must be greater than 0, not {value}.")


def _in_range(
    section: Any, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    value = getattr(section, name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise FedtrainError(f"{name} must be in {left}{low}, {high}{right}, not {value}.")
