"""Local DP-SGD settings chosen by rule from what a client knows before it trains.

A run may leave `batch_size`, `local_epochs`, `lr` and `max_grad_norm` unset; each client then chooses
them when it plans the run (clients/handlers.py), from its own number of training examples N (public
in DP-SGD's analysis), the model family and the run's privacy target (epsilon, delta, rounds, planned
metric releases), and keeps them in its plan on its sealed ledger. A value the run sets is used as
given. The model's shape never depends on N: the server and every client build the same model.

The rules (docs/privacy.md, "Defaults that carry over", gives the measurements behind each):

1. Clipping bound C = 1. At DP-SGD's noise levels nearly every per-example gradient is clipped, so the
   update is lr * C * (mean of unit gradients) + lr * C * sigma / B * noise: only lr * C matters, and
   C is fixed while lr is chosen.
2. Local epochs per round: `LOCAL_EPOCHS[family]`, so a run makes rounds * local_epochs passes over
   the data whatever N is.
3. Batch size: the smallest expected batch B = N / k (k whole steps per epoch, B at least `MIN_BATCH`)
   whose noise multiplier, calibrated for the whole run with the RDP accountant, is at least
   `SIGMA_TARGET`. With little noise per step the accountant charges more for each step than its
   asymptotic rate (epsilon a function of q sqrt(T) / sigma), so smaller batches buy more steps but
   more noise per unit of progress; above the target the batch hardly changes the noise of the run.
   Small N or small epsilon give small batches, large N or large epsilon large ones. The sample rate
   never exceeds `MAX_SAMPLE_RATE` (inside a client's default policy, which refuses q > 0.5). With a
   fixed noise multiplier instead of a target, epsilon is whatever the batch makes it, and the noise
   per unit of progress falls with the batch (as sigma / sqrt(q)): the batch is the largest allowed.
4. Learning rate: lr = `EPOCH_STEP[family]` * q, q = B / N the sample rate. Each epoch then moves the
   model by the same length (lr * steps per epoch = EPOCH_STEP) whatever the batch: the linear scaling
   rule, which keeps the noise a run accumulates per unit of progress fixed when B changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fedtrain.config import Config
from fedtrain.errors import FedtrainError

FAMILIES = ("logistic", "mlp", "cnn", "other")
MAX_GRAD_NORM = 1.0
LOCAL_EPOCHS = {"logistic": 2, "mlp": 2, "cnn": 1, "other": 1}
EPOCH_STEP = {"logistic": 4.0, "mlp": 4.0, "cnn": 4.0, "other": 4.0}
SIGMA_TARGET = 3.0
MIN_BATCH = 16
MAX_SAMPLE_RATE = 0.25
SigmaFor = Callable[[float, int], float]  # (sample rate, steps per round) -> the run's noise multiplier


@dataclass(frozen=True)
class LocalTraining:
    """The local DP-SGD settings a client uses for a whole run, and which of them a rule chose."""

    batch_size: int
    local_epochs: int
    lr: float
    max_grad_norm: float
    chosen: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chosen": list(self.chosen)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalTraining:
        return cls(
            int(data["batch_size"]),
            int(data["local_epochs"]),
            float(data["lr"]),
            float(data["max_grad_norm"]),
            tuple(str(c) for c in data.get("chosen", ())),
        )


def family(model: str) -> str:
    """The rule family of a model name: a built-in's own, "other" for MODULE:FACTORY."""
    return model if model in FAMILIES else "other"


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Opacus's Poisson loader runs ceil(N / B) steps per epoch, each sampling at 1 / that."""
    return max(1, math.ceil(num_samples / batch_size))


def resolve(
    config: Config,
    num_samples: int,
    *,
    sigma_for: SigmaFor | None = None,
) -> LocalTraining:
    """The local DP-SGD settings of this client's run: the run's values, and the rules' where it set none.

    Args:
        config: the run's config (None in lr, batch_size, local_epochs or max_grad_norm: choose it).
        num_samples: this client's training examples N.
        sigma_for: `(sample_rate, steps_per_round) -> noise multiplier` of the whole run at that rate
            (the client's calibration); needed only when the batch size is chosen under a target epsilon.

    Returns:
        The settings, with the names of those a rule chose.

    Raises:
        FedtrainError: when the client has no training example.
    """
    if num_samples < 1:
        raise FedtrainError("this client has no training example left after its held-out split.")
    fam = family(config.training.model)
    training, chosen = config.training, list[str]()
    local_epochs = training.local_epochs
    if local_epochs is None:
        local_epochs, chosen = LOCAL_EPOCHS[fam], [*chosen, "local_epochs"]
    batch = training.batch_size
    if batch is None:
        batch, chosen = _batch_size(num_samples, local_epochs, config, sigma_for), [*chosen, "batch_size"]
    clip = config.privacy.max_grad_norm
    if clip is None:
        clip, chosen = MAX_GRAD_NORM, [*chosen, "max_grad_norm"]
    lr = training.lr
    if lr is None:
        rate = 1.0 / steps_per_epoch(num_samples, batch)
        lr, chosen = EPOCH_STEP[fam] * rate * MAX_GRAD_NORM / clip, [*chosen, "lr"]
    return LocalTraining(batch, local_epochs, lr, clip, tuple(chosen))


def _batch_size(num_samples: int, local_epochs: int, config: Config, sigma_for: SigmaFor | None) -> int:
    """Rule 3: the smallest batch (most steps per epoch) whose noise multiplier reaches SIGMA_TARGET."""
    most_steps = max(1, num_samples // MIN_BATCH)  # steps per epoch with the smallest batch
    fewest_steps = max(1, math.ceil(1 / MAX_SAMPLE_RATE))
    if most_steps <= fewest_steps:
        return max(1, math.ceil(num_samples / fewest_steps))
    if config.privacy.target_epsilon is None or sigma_for is None:  # a fixed noise: the largest batch
        return math.ceil(num_samples / fewest_steps)

    def sigma(steps: int) -> float:
        assert sigma_for is not None  # checked above
        return float(sigma_for(1.0 / steps, steps * local_epochs))

    if sigma(most_steps) >= SIGMA_TARGET:
        return math.ceil(num_samples / most_steps)
    low, high = fewest_steps, most_steps  # sigma(low) is the largest there is; find the most steps reaching it
    if sigma(low) < SIGMA_TARGET:
        return math.ceil(num_samples / low)
    while high - low > 1:
        middle = (low + high) // 2
        if sigma(middle) >= SIGMA_TARGET:
            low = middle
        else:
            high = middle
    return math.ceil(num_samples / low)
