"""`fedtrain audit`: a simulated run of a configuration with canaries in one client's data, and the
epsilon lower bound they show beside the epsilon that client accounted (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

    draw m canaries and their inclusion bits      audit/canaries.py
    run the simulation (fedtrain.api.run)         the canary client: its own DP-SGD, preflight, ledger
    score every canary                            audit/scores.py (input: loss; gradient: its updates)
    guess, count, bound                           audit/guesses.py, audit/bound.py
    privacy.json's "audit" section                through the run's integrity record

A lower bound above the accounted epsilon means the guarantee is broken (`AuditResult.broken`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain import training_defaults
from fedtrain.audit.canaries import KINDS, CanaryData, CanarySet, Kind, make_canaries
from fedtrain.audit.guesses import Guesses, as_dicts, best_guesses
from fedtrain.audit.scores import gradient_scores, input_scores
from fedtrain.components import Components, outputs_for, task_for
from fedtrain.config import Config
from fedtrain.errors import FedtrainError
from fedtrain.privacy.policy import ClientPolicy

DEFAULT_CANARIES = 1000  # at most the model's trainable values for gradient canaries
NOTE = (
    "epsilon_lower is what one attack (m canaries, each included with probability 1/2, guessed from their scores) "
    "proves about this run at the stated confidence: a lower bound, not a guarantee. A small one does not show the "
    "training private; one above epsilon shows the accounted epsilon wrong."
)


@dataclass(frozen=True)
class AuditResult:
    """What an audit found, beside what the canary client accounted."""

    epsilon_lower: float
    epsilon: float  # the canary client's accounted epsilon for the run
    delta: float
    accountant: str
    client: str
    kind: str
    m: int
    best: Guesses
    tried: list[Guesses]
    confidence: float
    positive_control: bool
    run_dir: Path

    @property
    def broken(self) -> bool:
        """Whether the lower bound exceeds the accounted epsilon: the guarantee does not hold."""
        return self.epsilon_lower > self.epsilon

    def verdict(self) -> str:
        """One sentence on what the bound says about the accounted epsilon."""
        if self.broken:
            control = " (expected: this positive control trained without noise)" if self.positive_control else ""
            return (
                f"the privacy guarantee is broken: {self.client}'s training shows epsilon >= {self.epsilon_lower:.3f} "
                f"at {self.confidence:.0%} confidence, above its accounted epsilon {self.epsilon:.3f}{control}"
            )
        return f"consistent: epsilon_lower {self.epsilon_lower:.3f} <= the accounted epsilon {self.epsilon:.3f}"

    def section(self) -> dict[str, Any]:
        """privacy.json's "audit" section."""
        return {
            "epsilon_lower": self.epsilon_lower,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "client": self.client,
            "confidence": self.confidence,
            "canaries": {"kind": self.kind, "m": self.m, "score": SCORES[self.kind]},
            "guesses": self.best.guesses,
            "correct": self.best.correct,
            "tried": as_dicts(self.tried),
            "positive_control": self.positive_control,
            "verdict": self.verdict(),
            "note": NOTE,
        }


SCORES = {
    "input": "black-box: minus the final model's loss on the canary",
    "gradient": "white-box: the canary's coordinate of the client's updates, less their replay on its real data",
}


def audit(
    config: Config,
    *,
    kind: str = "gradient",
    canaries: int | None = None,
    confidence: float = 0.95,
    positive_control: bool = False,
    policy: ClientPolicy | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    verbose: bool = False,
    announce: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit a simulated run of `config`: canaries in client-0's data, then the bound they show.

    Args:
        config: the run's config (as `fedtrain simulate` resolves it).
        kind: "gradient" (white-box, the default) or "input" (black-box) canaries.
        canaries: how many (default 1000, or the model's trainable values if fewer, for gradient canaries).
        confidence: of the lower bound, e.g. 0.95.
        positive_control: train the canary client without noise while its ledger records it (the audit's
            own control: what an accounting bug looks like).
        policy: a policy every simulated client applies.
        on_round: called with each round's metrics.
        verbose: Flower's own log lines.
        announce: told where the key and the run directory are.

    Returns:
        The AuditResult; privacy.json of its run directory holds it as "audit".

    Raises:
        FedtrainError: a bad input, or the run stopped (one sentence).
    """
    from fedtrain import api, simulation
    from fedtrain.data.partition import simulation_client_split
    from fedtrain.models import build_model

    if kind not in KINDS:
        raise FedtrainError(f"--canary-kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    if not 0 < confidence < 1:
        raise FedtrainError(f"--confidence must be in (0, 1), for example 0.95, not {confidence}.")
    described, _ = simulation.prepare(config)  # the data's classes and shape; every check before anything runs
    task = task_for(described)
    train, held_out = simulation_client_split(described, 0, None, task.target_kind)
    shape = described.data.input_shape
    assert shape is not None

    def make_model() -> Any:
        return build_model(described.training.model, shape, outputs_for(described, task),
                           hidden=described.training.hidden, seed=described.federation.seed)  # fmt: skip

    model = make_model()
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = (
        canaries
        if canaries is not None
        else (min(DEFAULT_CANARIES, values) if kind == "gradient" else DEFAULT_CANARIES)
    )
    classes = described.data.num_classes if task.target_kind == "classes" else None
    record_dir = Path(tempfile.mkdtemp(prefix="fedtrain-audit-"))  # 0700: the canary client's sealed rounds
    try:
        clip = training_defaults.resolve(described, len(train)).max_grad_norm  # the rule's C does not depend on N
        chosen = make_canaries(_kind(kind), m, train, model, clip, positive_control, record_dir, classes)
        # Values left to the rules are pinned to those the canary client chooses with its canaries, so that
        # every client trains with them and the replay of its training (_scores) uses the same.
        pinned = _pinned_training(described, policy, len(CanaryData(train, chosen)), len(held_out),
                                  len(train) + len(held_out))  # fmt: skip
        config, described = config.replace(**pinned), described.replace(**pinned)
        if config.deployment.run_dir is None:
            config = config.replace(run_dir=_default_run_dir(positive_control))
        result = api.run(config, components=Components(probe=chosen), policy=policy, on_round=on_round,
                         verbose=verbose, announce=announce)  # fmt: skip
        scores = _scores(chosen, result.model, make_model, train, task, described)
    finally:
        shutil.rmtree(record_dir, ignore_errors=True)
    client = result.privacy["clients"].get(chosen.client_name)
    if client is None:
        raise FedtrainError(f"{chosen.client_name} reported no privacy ledger, so its epsilon cannot be compared.")
    best, tried = best_guesses(scores, chosen.included, float(client["delta"]), confidence)
    found = AuditResult(best.epsilon_lower, float(client["epsilon"]), float(client["delta"]), client["accountant"],
                        chosen.client_name, kind, m, best, tried, confidence, positive_control,
                        result.run_dir)  # fmt: skip
    _record(found, result.key_file)
    return found


def _pinned_training(
    config: Config, policy: ClientPolicy | None, num_train: int, num_held_out: int, records: int
) -> dict[str, Any]:
    """The canary client's rule-chosen local settings (clients/handlers.py), as config values: its
    training split holds `num_train` examples with the canaries, its shard `records` without them."""
    from fedtrain.clients.handlers import chosen_training
    from fedtrain.privacy.calibration import client_delta

    own = policy or ClientPolicy()
    delta = config.privacy.delta if config.privacy.delta is not None else client_delta(records, own.delta)
    local = chosen_training(config, own, num_train, num_held_out, delta)
    return {name: getattr(local, name) for name in local.chosen}


def _kind(kind: str) -> Kind:
    return "gradient" if kind == "gradient" else "input"


def _default_run_dir(positive_control: bool) -> str:
    return str(
        Path("runs") / (time.strftime("%Y%m%d-%H%M%S") + ("-positive-control" if positive_control else "-audit"))
    )


def _scores(chosen: CanarySet, final: Any, make_model: Callable, train: Any, task: Any, config: Config) -> Any:
    from fedtrain.clients.trainer import TrainSettings

    if chosen.kind == "input":
        return input_scores(chosen, final, task)
    mu = config.strategy.proximal_mu if config.strategy.name == "fedprox" else 0.0
    local = training_defaults.resolve(config, len(train))  # pinned by `audit`: the values as given
    settings = TrainSettings(local.batch_size, local.local_epochs, local.lr, config.training.momentum,
                             local.max_grad_norm, proximal_mu=mu)  # fmt: skip
    return gradient_scores(chosen, chosen.records(), make_model, train, task, settings)


def _record(found: AuditResult, key_file: Path | None) -> None:
    """privacy.json's "audit" section, written through the run's integrity record."""
    from fedtrain.security.keys import load_model_key
    from fedtrain.server.history import add_privacy_section
    from fedtrain.server.verification import run_integrity

    key = load_model_key(str(key_file) if key_file else None)
    add_privacy_section(found.run_dir, "audit", found.section(), run_integrity(found.run_dir, key))


__all__ = ["DEFAULT_CANARIES", "AuditResult", "audit"]
