"""One typed configuration for a fedtrain run.

Sources, later ones winning: built-in defaults < TOML file < command-line options. The same
object travels to the ServerApp and ClientApps as Flower's flat `run_config` (keys with dashes).
Secrets never live here: a config holds the *path* of a key file, never a key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtrain.errors import FedtrainError
from fedtrain.fileio import read_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PARTITIONS = ("iid", "dirichlet")
ACCOUNTANTS = ("prv", "rdp")
CENTRAL_DP_MODES = ("off", "fixed", "adaptive")
METRICS_MODES = ("none", "private", "plain")  # ordered: how much a client releases about its data


@dataclass
class Config:
    """Every option of a run. Each field is a TOML key and (with dashes) a CLI option."""

    # data
    data: str = "digits"
    label_column: str = "label"
    labels: list[str] | None = None
    num_classes: int | None = None
    input_shape: list[int] | None = None
    eval_fraction: float = 0.05
    test_fraction: float = 0.1
    # federation
    clients: int = 5
    rounds: int = 30
    partition: str = "iid"
    alpha: float = 0.5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_fit_clients: int = 1  # a round whose usable updates are fewer stops the run, keeping the last model
    min_available_clients: int | None = None  # clients online before a round starts (unset: min_fit_clients)
    round_timeout: float = 600.0
    # aggregation (docs/strategies.md); server_lr unset means 0.1 for the FedOpt family, 1.0 for fedavgm
    strategy: str = "fedavg"
    max_update_norm: float | None = None  # an update d with ||d||_2 above this is rejected before aggregation
    server_lr: float | None = None
    server_momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    proximal_mu: float = 0.0
    num_malicious: int = 0
    num_selected: int | None = None
    trim_beta: float = 0.2
    # client-level (central) DP on the server: clip each update, noise the mean (docs/strategies.md)
    central_dp: str = "off"  # off | fixed | adaptive
    central_noise_multiplier: float = 1.0
    central_clipping_norm: float = 1.0  # the bound (fixed) or its starting value (adaptive)
    central_target_quantile: float = 0.5  # adaptive: share of updates meant to fall under the bound
    central_clip_lr: float = 0.2  # adaptive: how fast the bound follows that quantile
    central_delta: float | None = None  # unset: 1e-5, or 1 / (10 * clients) if smaller
    max_client_epsilon: float | None = None  # a run whose planned rounds would exceed it does not start
    # secure aggregation (Flower's SecAgg+): the server learns only the sum of the updates
    secure_aggregation: bool = False
    secagg_update_bound: float = 10.0  # clients scale updates to this L2 norm; quantisation range [-R, R]
    secagg_threshold: float = 0.6  # share of a client's shares needed to unmask it if it drops out
    # model and local training
    # The demo's defaults, chosen by a search over DP-FedAvg settings on digits at epsilon 3
    # (see docs/privacy.md): plain logistic regression, large Poisson batches, two local epochs.
    model: str = "logistic"
    hidden: int = 32
    lr: float = 1.0
    momentum: float = 0.0
    batch_size: int = 100
    local_epochs: int = 2
    max_physical_batch_size: int | None = None  # GPU memory: compute a batch in chunks of this size
    # differential privacy (sample-level, per client)
    target_epsilon: float | None = 3.0
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    max_epsilon: float | None = None
    accountant: str = "prv"
    # metrics computed on private data: private (Gaussian mechanism, on the ledger), none, or plain (exact:
    # outside the guarantee, said in words in privacy.json and the CLI); each client's policy has the last word
    metrics: str = "private"
    # run
    seed: int = 0
    device: str = "auto"
    payload_encryption: bool = False
    kit: str | None = None
    run_dir: str | None = None
    key_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> Config:
        """Check every value; raise FedtrainError naming the first bad one."""
        _positive_int(self, "clients", "rounds", "batch_size", "local_epochs", "hidden", "min_fit_clients")
        for name in ("min_fit_clients", "min_available_clients"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= self.clients:
                raise FedtrainError(f"{name} must be between 1 and clients ({self.clients}), not {value}.")
        _in_range(self, "eval_fraction", 0.0, 0.9)
        _in_range(self, "test_fraction", 0.0, 0.9)
        _in_range(self, "fraction_train", 0.0, 1.0, low_open=True)
        _in_range(self, "fraction_evaluate", 0.0, 1.0)
        _in_range(self, "momentum", 0.0, 1.0, high_open=True)
        _positive(self, "alpha", "lr", "max_grad_norm", "round_timeout", "tau")
        _positive(self, *[n for n in ("server_lr", "max_update_norm") if getattr(self, n) is not None])
        for name in ("server_momentum", "beta_1", "beta_2"):
            _in_range(self, name, 0.0, 1.0, high_open=True)
        if self.proximal_mu < 0 or self.num_malicious < 0:
            raise FedtrainError("proximal_mu and num_malicious must not be negative.")
        if self.partition not in PARTITIONS:
            raise FedtrainError(f"partition must be one of {', '.join(PARTITIONS)}, not {self.partition!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise FedtrainError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {self.accountant!r}.")
        if self.metrics not in METRICS_MODES:
            raise FedtrainError(f"metrics must be one of {', '.join(METRICS_MODES)}, not {self.metrics!r}.")
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise FedtrainError(
                "give either target_epsilon or noise_multiplier, not both: "
                "one decides the other for the whole training."
            )
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise FedtrainError(
                "differential privacy needs target_epsilon or noise_multiplier; "
                "set one of them (for example target_epsilon = 3.0)."
            )
        _positive(self, *[n for n in ("target_epsilon", "max_epsilon") if getattr(self, n) is not None])
        if self.noise_multiplier is not None:
            _positive(self, "noise_multiplier")
        if self.delta is not None:
            _in_range(self, "delta", 0.0, 1.0, low_open=True, high_open=True)
        if self.max_physical_batch_size is not None:
            _positive_int(self, "max_physical_batch_size")
        self._validate_central_dp()
        if self.num_classes is not None and self.num_classes < 2:
            raise FedtrainError(f"num_classes must be at least 2, not {self.num_classes}.")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise FedtrainError("labels must not repeat a name; list every class once.")
        if self.labels is not None and self.num_classes not in (None, len(self.labels)):
            raise FedtrainError(
                f"num_classes is {self.num_classes} but labels lists {len(self.labels)} classes; "
                "make them agree or drop num_classes."
            )
        if self.input_shape is not None and (not self.input_shape or any(int(d) < 1 for d in self.input_shape)):
            raise FedtrainError(f"input_shape must be positive sizes, not {self.input_shape}.")
        return self

    def _validate_central_dp(self) -> None:
        if self.central_dp not in CENTRAL_DP_MODES:
            raise FedtrainError(f"central_dp must be one of {', '.join(CENTRAL_DP_MODES)}, not {self.central_dp!r}.")
        _positive(self, "central_noise_multiplier", "central_clipping_norm", "central_clip_lr")
        _in_range(self, "central_target_quantile", 0.0, 1.0)
        if self.central_delta is not None:
            _in_range(self, "central_delta", 0.0, 1.0, low_open=True, high_open=True)
        if self.max_client_epsilon is not None:
            _positive(self, "max_client_epsilon")
        _positive(self, "secagg_update_bound")
        _in_range(self, "secagg_threshold", 0.0, 1.0, low_open=True)

    @property
    def effective_central_delta(self) -> float:
        """delta for client-level DP: well below 1 / clients, the population it protects."""
        return self.central_delta if self.central_delta is not None else min(1e-5, 1 / (10 * self.clients))

    @property
    def clients_to_wait_for(self) -> int:
        """Clients that must be online before a round starts."""
        return max(self.min_fit_clients, self.min_available_clients or 0)

    @property
    def effective_max_epsilon(self) -> float | None:
        """The budget a client refuses to exceed: max_epsilon, else the target epsilon."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (None values are ignored) and validated."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given).validate()

    # ---- Flower run_config (flat dict of str/int/float/bool) ----

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """Flatten to Flower's run_config: dashed keys, None left out, lists as JSON."""
        out: dict[str, str | int | float | bool] = {}
        for f in _public_fields():
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name.replace("_", "-")] = json.dumps(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> Config:
        """Inverse of `to_run_config`; unknown keys are kept in `extra` for other components."""
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in _FIELD_NAMES:
                values[name] = json.loads(value) if _is_list_field(name) and isinstance(value, str) else value
            else:
                extra[key] = value
        return from_mapping(values, "the run config").replace(extra=extra or None)

    def to_toml(self) -> str:
        """Serialise the resolved config as TOML (None values are omitted)."""
        lines = ["# fedtrain resolved configuration"]
        for f in _public_fields():
            value = getattr(self, f.name)
            if value is not None:
                lines.append(f"{f.name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def _public_fields() -> list[dataclasses.Field]:
    return [f for f in fields(Config) if f.name != "extra"]


_FIELD_NAMES = {f.name for f in _public_fields()}


def _is_list_field(name: str) -> bool:
    return name in ("labels", "input_shape")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert one raw value to the field's type, or raise a one-sentence error."""
    default = getattr(Config(), name)
    kind = type(default) if default is not None else None
    if name in ("target_epsilon", "noise_multiplier", "delta", "max_epsilon", "central_delta", "max_client_epsilon"):
        kind = float
    elif name in ("num_classes", "min_available_clients", "max_physical_batch_size"):
        kind = int
    elif name in ("run_dir", "key_file", "kit"):
        kind = str
    try:
        if _is_list_field(name):
            if not isinstance(value, list):
                raise TypeError
            return [int(v) for v in value] if name == "input_shape" else [str(v) for v in value]
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
        wanted = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
        expected = "a list" if _is_list_field(name) else wanted.get(kind, "a value")
        raise FedtrainError(f"{name} in {source} must be {expected}, not {value!r}.") from None
    return value


def from_mapping(values: dict[str, Any], source: str) -> Config:
    """Build a validated Config from a flat mapping (TOML table, run_config...).

    A value of None means "unset" and overrides a default (e.g. target_epsilon = None).
    """
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        valid = ", ".join(sorted(_FIELD_NAMES))
        raise FedtrainError(f"unknown option {unknown[0]!r} in {source}; valid options are: {valid}.")
    if values.get("noise_multiplier") is not None and "target_epsilon" not in values:
        values = {**values, "target_epsilon": None}  # a fixed sigma replaces the default target
    config = Config(**{k: _coerce(k, v, source) for k, v in values.items() if v is not None})
    for name in (k for k, v in values.items() if v is None):
        setattr(config, name, None)
    return config.validate()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a flat dict (dashes or underscores accepted)."""
    path = Path(path)
    raw = read_bytes(path, "config file", "check the path")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FedtrainError(f"config file {path} is not valid TOML ({exc}); fix the syntax.") from None
    table = table.get("fedtrain", table) if isinstance(table.get("fedtrain"), dict) else table
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise FedtrainError(
            f"config file {path} has a section [{nested[0]}]; fedtrain options are plain top-level keys."
        )
    return {k.replace("-", "_"): v for k, v in table.items()}


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


def _positive_int(config: Config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise FedtrainError(f"{name} must be at least 1, not {value}.")


def _positive(config: Config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise FedtrainError(f"{name} must be greater than 0, not {value}.")


def _in_range(
    config: Config, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    value = getattr(config, name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise FedtrainError(f"{name} must be in {left}{low}, {high}{right}, not {value}.")
