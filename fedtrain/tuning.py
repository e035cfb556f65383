"""`fedtrain tune`: private hyperparameter tuning in simulation, its price on every client's ledger.

A tuning runs a secret, random number K of trials (K ~ D(eta, gamma), privacy/tuning.py), each a
whole simulated run with a candidate drawn at random from the search space, and keeps only the best
trial, chosen by the headline metric on half of the central test split. Papernot and Steinke's
theorem then bounds the whole tuning by about what one run spends, not K runs. Its conditions are
kept here:

- nothing of the other trials leaves: each is deleted once beaten, and no trial releases metrics
  computed on private data (metrics = "none");
- K stays secret: it is drawn from the OS's randomness and never written or printed;
- each client charges its ledger once, for the whole tuning, before the first trial trains, with
  noise it calibrated itself so that the tuning spends its target epsilon (clients/handlers.py).

The search space holds the settings that leave a trial's privacy analysis unchanged (learning rate
and clipping bound): every trial has the same noise, sample rate and steps, as the theorem's single
mechanism must. The reported test metric is on the other half of the central split, which no
choice saw.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtrain.api import RunResult, load_model
from fedtrain.components import Components, task_for
from fedtrain.config import Config
from fedtrain.data import Dataset, Subset
from fedtrain.errors import FedtrainError
from fedtrain.fileio import atomic_write_text
from fedtrain.privacy.calibration import tuning_floor
from fedtrain.privacy.policy import ClientPolicy
from fedtrain.privacy.tuning import TrialCount
from fedtrain.tasks import Task

TUNING_JSON = "tuning.json"
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
CLIP_FACTORS = (0.5, 1.0, 2.0)
SMALLEST_DELTA = 1e-9  # no client's delta is below this (1 / (10 N) for N up to 10^8 records)


@dataclass(frozen=True)
class SearchSpace:
    """The candidates a tuning draws from, uniformly: every pair of a learning rate and a clipping bound.

    Only settings that leave a trial's privacy analysis unchanged belong here: the noise multiplier
    (calibrated by each client), sample rate and steps are the same in every trial. An axis named in
    `scaled` holds factors of the value each client chooses by rule (fedtrain/training_defaults.py:
    the run leaves it unset), sent as `lr_scale` / `max_grad_norm_scale`; the others hold values.
    """

    lr: tuple[float, ...]
    max_grad_norm: tuple[float, ...]
    scaled: tuple[str, ...] = ()

    @classmethod
    def around(cls, config: Config) -> SearchSpace:
        """Factors of 1/4 to 4 of the learning rate, 1/2 to 2 of the clipping bound: of the configured
        value, or of each client's rule where the run sets none."""
        lr, clip = config.training.lr, config.privacy.max_grad_norm
        return cls(
            tuple((1.0 if lr is None else lr) * f for f in LR_FACTORS),
            tuple((1.0 if clip is None else clip) * f for f in CLIP_FACTORS),
            tuple(name for name, value in (("lr", lr), ("max_grad_norm", clip)) if value is None),
        )

    def __post_init__(self) -> None:
        for name, values in (("lr", self.lr), ("max_grad_norm", self.max_grad_norm)):
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise FedtrainError(f"the search space's {name} values must be positive numbers, not {list(values)}.")
        if not set(self.scaled) <= {"lr", "max_grad_norm"}:
            raise FedtrainError(f"only lr and max_grad_norm can be scaled, not {list(self.scaled)}.")

    def _key(self, name: str) -> str:
        return f"{name}_scale" if name in self.scaled else name

    def candidates(self) -> list[dict[str, float]]:
        """Every candidate, as config values."""
        lr, clip = self._key("lr"), self._key("max_grad_norm")
        return [{lr: a, clip: b} for a, b in itertools.product(self.lr, self.max_grad_norm)]

    def to_dict(self) -> dict[str, list[float]]:
        return {self._key("lr"): list(self.lr), self._key("max_grad_norm"): list(self.max_grad_norm)}


@dataclass
class TuneResult(RunResult):
    """A RunResult for the best trial, with what was chosen and how it scores on unseen data."""

    chosen: dict[str, float] | None = None
    validation: dict[str, float] | None = None
    test: dict[str, float] | None = None


def tune(
    config: Config,
    *,
    expected_trials: float = 8.0,
    eta: float = 0.0,
    space: SearchSpace | None = None,
    components: Components | None = None,
    policy: ClientPolicy | None = None,
    temporary: bool = False,
    announce: Callable[[str], None] | None = None,
    rng: np.random.Generator | None = None,
) -> TuneResult:
    """Tune in simulation: the best of K ~ D(eta, gamma) random trials, with mean `expected_trials`.

    Args:
        config: the run's config; each client spends its target epsilon on the whole tuning.
        expected_trials: E[K].
        eta: the trial count's shape: 0 (logarithmic, the cheapest for a given E[K]), 1 (geometric), ...
        space: the candidates (default: `SearchSpace.around(config)`).
        components: Python objects in place of names (the API's).
        policy: the policy every simulated client applies.
        temporary: a temporary run directory and key when the config names none.
        announce: told where the key and the run directory are, and how tuning goes (the CLI prints it).
        rng: the generator of K and the candidates (tests only: by default the OS's randomness, as
            the guarantee needs K secret).

    Returns:
        The best trial's run (in the run directory), the candidate chosen and its scores.

    Raises:
        FedtrainError: bad settings, tuning alone over the budget, or a trial that could not run.
    """
    from fedtrain import api, simulation

    say = announce or (lambda text: None)
    trials = TrialCount.with_mean(expected_trials, eta)
    space = space or SearchSpace.around(config)
    config = config.replace(
        metrics="none", tuning_trials=float(expected_trials), tuning_eta=float(eta), tuning_id=secrets.token_hex(8)
    )
    _refuse_over_budget(config, trials)
    described, test_set = simulation.prepare(config, components)  # before any file exists
    validation, held_out = _halves(test_set, config.federation.seed)
    task = task_for(described, components)
    path = api._run_dir(config, False, temporary)
    key = api._model_key(config, False, temporary)
    say(f"model key: {key.source} (key id {key.key_id}); keep it to open the model.")
    say(f"run directory: {path}")
    say(
        f"tuning: {len(space.candidates())} candidates, {expected_trials:g} trials expected; their number is "
        "random and kept secret, as the privacy guarantee requires"
    )
    path.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=".trials-", dir=path))
    generator = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    best: tuple[float, Path, dict[str, float], list[dict[str, Any]]] | None = None
    try:
        for _ in range(trials.sample(generator)):
            candidate = space.candidates()[int(generator.integers(len(space.candidates())))]
            trial_dir = workspace / secrets.token_hex(6)
            trial = config.replace(run_dir=str(trial_dir), key_file=str(key.path) if key.path else None, **candidate)
            try:
                rows = simulation.run(trial, prepared=(described, validation), components=components, policy=policy,
                                      ledger_dir=path / "ledgers")  # fmt: skip
            except FedtrainError as exc:
                raise FedtrainError(f"tuning stopped: a trial could not run ({exc})") from None
            score = _score(rows, task)
            if best is None or score > best[0]:
                if best is not None:
                    shutil.rmtree(best[1], ignore_errors=True)
                best = (score, trial_dir, candidate, rows)
            else:
                shutil.rmtree(trial_dir, ignore_errors=True)
        assert best is not None  # K >= 1
        _, trial_dir, chosen, rows = best
        _adopt(trial_dir, path)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    model = load_model(path, key.path, model=components.model if components else None, task=task)
    test = _test_metrics(model, held_out, task)
    _write_report(path, key.key, trials, space, chosen, rows[-1], test)
    privacy = json.loads((path / "privacy.json").read_text())
    say(
        f"chosen: {', '.join(f'{k} {v:g}' for k, v in chosen.items())}; {_shown(_headline(rows[-1]))} on the half of "
        f"the test split that chose it, {_shown(test)} on the unseen half"
    )
    return TuneResult(model, rows, privacy, path, key.path, chosen, _headline(rows[-1]), test)


def _refuse_over_budget(config: Config, trials: TrialCount) -> None:
    """Tuning with no training at all already spends this much: refuse before anything runs."""
    assert config.privacy.target_epsilon is not None  # the config's validation requires it
    delta = config.privacy.delta if config.privacy.delta is not None else SMALLEST_DELTA
    floor = tuning_floor(delta, trials)
    if floor >= config.privacy.target_epsilon:
        raise FedtrainError(
            f"tuning with {trials.mean:g} expected trials alone costs epsilon {floor:.3f} (delta {delta:g}) before "
            f"any training, over the target epsilon {config.privacy.target_epsilon:g}; raise it or expect fewer trials."
        )


def _halves(test_set: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """The central test split in two fixed halves: one chooses the trial, the other reports on it."""
    if len(test_set) < 2:
        raise FedtrainError("tuning needs a central test split of at least 2 examples to choose and report on.")
    order = np.random.default_rng(seed).permutation(len(test_set))
    middle = len(order) // 2
    return Subset(test_set, np.sort(order[:middle])), Subset(test_set, np.sort(order[middle:]))


def _score(rows: list[dict[str, Any]], task: Task) -> float:
    """The last round's headline metric on the validation half, higher is better (NaN: worst)."""
    value = float(rows[-1]["accuracy"]) if rows and rows[-1].get("accuracy") is not None else math.nan
    if not math.isfinite(value):
        return -math.inf
    return value if task.higher_is_better else -value


def _headline(row: dict[str, Any]) -> dict[str, float]:
    return {str(row.get("metric", "accuracy")): float(row["accuracy"])}


def _adopt(trial_dir: Path, path: Path) -> None:
    """Make the best trial the run: its files moved in, its config naming the run directory, its
    checkpoint dropped (a tuned run is final: resuming would train past the tuning's plan)."""
    from fedtrain.api import _run_config
    from fedtrain.server.model_files import CHECKPOINT_FILE

    for item in trial_dir.iterdir():
        if item.name != CHECKPOINT_FILE:
            os.replace(item, path / item.name)
    atomic_write_text(path / "config.toml", _run_config(path).replace(run_dir=str(path)).to_toml())


def _test_metrics(model: Any, held_out: Dataset, task: Task) -> dict[str, float]:
    import torch

    from fedtrain.evaluation import evaluate_task

    return evaluate_task(model, held_out, torch.device("cpu"), task)


def _write_report(
    path: Path,
    key: bytes,
    trials: TrialCount,
    space: SearchSpace,
    chosen: dict[str, float],
    last: dict[str, Any],
    test: dict[str, float],
) -> None:
    """tuning.json, recorded in the run's integrity record like the other reports."""
    from fedtrain.security.run_integrity import RunIntegrity
    from fedtrain.server.model_files import read_run_info

    report = {
        "expected_trials": trials.mean,
        "trial_count": {"distribution": "truncated negative binomial", "eta": trials.eta, "gamma": trials.gamma},
        "search_space": space.to_dict(),
        "chosen": chosen,
        "selected_by": "the last round's headline metric on half of the central test split",
        "validation": _headline(last),
        "test": test,
        "privacy": (
            "each client's ledger holds one 'tuning' entry: the whole tuning, accounted by Papernot and Steinke "
            "(ICLR 2022, Theorem 2); its epsilon in privacy.json is the total of tuning and training. The number of "
            "trials is secret and the other trials were deleted, as the theorem requires."
        ),
    }
    integrity = RunIntegrity(path, key, read_run_info(path)["run_id"])
    integrity.write({TUNING_JSON: (json.dumps(report, indent=2) + "\n").encode()})


def _shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
