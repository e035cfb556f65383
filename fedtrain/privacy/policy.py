"""A client's own privacy policy: what any run may ask of this client's data.

The server proposes a run (its config reaches every client); each client checks the proposal against
its policy and refuses, in one sentence, what breaks it. The server's config can ask; it cannot
override. A real client reads its policy from its kit (`policy.toml`, written by `fedtrain provision`
with the defaults below, editable) or from `fedtrain client --policy FILE`.

In `fedtrain simulate` the person running it holds all the data and sets the config: unless
`--policy FILE` is given, simulated clients admit exactly the run's own settings (`admitting`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtrain.config import ACCOUNTANTS, METRICS_MODES, toml_value
from fedtrain.errors import FedtrainError
from fedtrain.fileio import read_bytes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from fedtrain.config import Config
    from fedtrain.privacy.calibration import RunPlan

BUILTIN_MODELS = ("logistic", "mlp", "cnn")
BUILTIN_TASKS = ("classification", "regression", "multilabel")
POLICY_FILE = "policy.toml"


def metrics_rank(mode: str) -> int:
    """none < private < plain: how much a metrics mode releases."""
    return METRICS_MODES.index(mode)


@dataclass(frozen=True)
class ClientPolicy:
    """Every limit a client sets on runs over its data (each field is a key of policy.toml)."""

    max_run_epsilon: float = 3.0  # one run, training and metrics together
    max_lifetime_epsilon: float = 10.0  # every run ever over this shard (and shards sharing records with it)
    delta: float | None = None  # the largest delta accepted; unset: min(1e-5, 1 / (10 N))
    min_noise_multiplier: float = 0.5  # DP-SGD noise below this is refused, whatever the accountant says
    max_sample_rate: float = 0.5  # Poisson sample rate of a DP-SGD step
    max_eval_fraction: float = 0.2  # share of the shard held out for evaluation
    metrics: str = "private"  # the most this client releases: none < private < plain
    metrics_share: float = 0.05  # share of a run's epsilon for metric releases (training gets the rest)
    models: tuple[str, ...] = BUILTIN_MODELS  # `module:factory` runs only if listed here
    tasks: tuple[str, ...] = BUILTIN_TASKS  # `module:Name` runs only if listed here
    accountant: str = "prv"  # for the lifetime epsilon
    share_lifetime_epsilon: bool = True  # tell the server the lifetime epsilon with every reply

    def validate(self, source: str = "the policy") -> ClientPolicy:
        """Check every value; raise FedtrainError naming the first bad one."""
        for name in ("max_run_epsilon", "max_lifetime_epsilon", "min_noise_multiplier"):
            if not getattr(self, name) > 0:
                raise FedtrainError(f"{name} in {source} must be greater than 0, not {getattr(self, name)}.")
        for name, low, high in (("max_sample_rate", 0, 1), ("max_eval_fraction", 0, 0.9), ("metrics_share", 0, 1)):
            value = getattr(self, name)
            if not (low < value <= high if name != "metrics_share" else low < value < high):
                raise FedtrainError(f"{name} in {source} must be in ({low}, {high}], not {value}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise FedtrainError(f"delta in {source} must be in (0, 1), not {self.delta}.")
        if self.metrics not in METRICS_MODES:
            raise FedtrainError(f"metrics in {source} must be one of {', '.join(METRICS_MODES)}, not {self.metrics!r}.")
        if self.accountant not in ACCOUNTANTS:
            raise FedtrainError(f"accountant in {source} must be one of {', '.join(ACCOUNTANTS)}.")
        if not self.models or not self.tasks:
            raise FedtrainError(f"models and tasks in {source} must each list at least one it accepts.")
        return self

    # ------------------------------------------------------------------ what runs are refused

    def refusal_for_run(self, config: Config) -> str | None:
        """Why this client refuses the run's settings before it touches any data, or None."""
        if config.training.model not in self.models:
            return (
                f"the run's model {config.training.model!r} is not one this client accepts ({', '.join(self.models)}); "
                "a client never imports code because the server named it"
            )
        if config.training.task not in self.tasks:
            return (
                f"the run's task {config.training.task!r} is not one this client accepts ({', '.join(self.tasks)}); "
                "a client never imports code because the server named it"
            )
        if config.data.eval_fraction > self.max_eval_fraction:
            return (
                f"the run holds out {config.data.eval_fraction:g} of the shard for evaluation, more than this client's "
                f"max_eval_fraction {self.max_eval_fraction:g}"
            )
        if config.privacy.noise_multiplier is not None and config.privacy.noise_multiplier < self.min_noise_multiplier:
            return (
                f"the run's noise multiplier {config.privacy.noise_multiplier:g} is below this client's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        if config.privacy.target_epsilon is not None and config.privacy.target_epsilon > self.max_run_epsilon * (
            1 + 1e-9
        ):
            return (
                f"the run targets epsilon {config.privacy.target_epsilon:g}, more than this client's max_run_epsilon "
                f"{self.max_run_epsilon:g}"
            )
        if metrics_rank(config.privacy.metrics) > metrics_rank(self.metrics):
            asked = config.privacy.metrics
            return f"the run asks for {asked} metrics; this client releases at most {self.metrics} metrics"
        if self.delta is not None and config.privacy.delta is not None and config.privacy.delta > self.delta:
            return f"the run's delta {config.privacy.delta:g} is larger than this client's {self.delta:g}"
        return None

    def refusal_for_plan(self, plan: RunPlan, largest_delta: float) -> str | None:
        """Why this client refuses the run's plan (known once it knows its shard's size), or None."""
        if plan.noise_multiplier < self.min_noise_multiplier * (1 - 1e-9):
            return (
                f"the run needs a DP-SGD noise multiplier of {plan.noise_multiplier:.3g} here, below this client's "
                f"minimum {self.min_noise_multiplier:g} (too few examples for its target epsilon over its rounds)"
            )
        if plan.sample_rate > self.max_sample_rate:
            return (
                f"the run's batch size gives a sample rate of {plan.sample_rate:.3g}, above this client's "
                f"max_sample_rate {self.max_sample_rate:g}"
            )
        if plan.delta > largest_delta:
            return f"the run's delta {plan.delta:g} is larger than this client's {largest_delta:g}"
        return None

    def run_cap(self, config: Config) -> float:
        """The most a run may spend here: this policy's cap, lowered by the run's own."""
        asked = config.effective_max_epsilon
        return min(self.max_run_epsilon, asked) if asked is not None else self.max_run_epsilon

    # ------------------------------------------------------------------ construction

    @classmethod
    def admitting(cls, config: Config) -> ClientPolicy:
        """A policy that admits exactly this run: what a simulation's clients use by default."""
        return cls(
            max_run_epsilon=config.effective_max_epsilon if config.effective_max_epsilon is not None else math.inf,
            max_lifetime_epsilon=math.inf,
            delta=config.privacy.delta,
            min_noise_multiplier=1e-9,  # the run's own noise, fixed or calibrated to its own target
            max_sample_rate=1.0,
            max_eval_fraction=max(config.data.eval_fraction, 0.9),
            metrics=config.privacy.metrics,
            models=(config.training.model,),
            tasks=(config.training.task,),
            accountant=config.privacy.accountant,
        )

    @classmethod
    def load(cls, path: str | Path) -> ClientPolicy:
        """Read and check a policy file (TOML, the keys of ClientPolicy; missing keys keep their defaults).

        Raises:
            FedtrainError: for a missing or unreadable file, an unknown key or a bad value.
        """
        path = Path(path)
        raw = read_bytes(path, "policy file", "check the path (--policy) or provision the kit again")
        try:
            table = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise FedtrainError(f"policy file {path} is not valid TOML ({exc}); fix the syntax.") from None
        return cls.from_mapping(table, f"policy file {path}")

    @classmethod
    def from_mapping(cls, table: dict[str, Any], source: str) -> ClientPolicy:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedtrainError(f"unknown key {key!r} in {source}; valid keys are: {', '.join(sorted(known))}.")
            values[name] = _coerce(name, value, getattr(cls, name), source)
        return cls(**values).validate(source)

    def to_toml(self) -> str:
        """The policy as the commented TOML file `fedtrain provision` writes into each client kit."""
        lines = [
            "# This client's privacy policy: every run the server proposes is checked against it, and refused",
            "# (with the reason, sent to the server) when it asks for more. Edit it to suit your data.",
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                lines.append(f"# {f.name} = 1e-05   (unset: min(1e-5, 1 / (10 N)))")
            else:
                lines.append(f"{f.name} = {toml_value(list(value) if isinstance(value, tuple) else value)}")
        return "\n".join(lines) + "\n"


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    try:
        if name in ("models", "tasks"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        number = float(value)
        if math.isnan(number):
            raise TypeError
        return number
    except TypeError:
        wanted = f"a list of {name}" if name in ("models", "tasks") else f"{type(default or 0.0).__name__}"
        raise FedtrainError(f"{name} in {source} must be {wanted}, not {value!r}.") from None
