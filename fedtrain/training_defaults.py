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
   at which the run's target epsilon still calls for a noise multiplier of at least `SIGMA_TARGET`:
   noise `SIGMA_TARGET` over the whole run (all rounds, the planned metric releases beside it, RDP)
   spends at least the target, so calibration gives it that much noise or more. With little noise per
   step the accountant charges more for each step than its asymptotic rate (epsilon a function of
   q sqrt(T) / sigma), so smaller batches buy more steps but more noise per unit of progress; above
   the target the batch hardly changes the noise of the run. Checking the target's epsilon at one
   noise level (one accountant call per batch tried) gives the same batch as calibrating the noise of
   each (a search of its own per batch), for a tenth of the time. Small N or small epsilon give small
   batches, large N or large epsilon large ones. The sample rate never exceeds `MAX_SAMPLE_RATE`
   (inside a client's default policy, which refuses q > 0.5). With a fixed noise multiplier instead of
   a target, epsilon is whatever the batch makes it, and the noise per unit of progress falls with the
   batch (as sigma / sqrt(q)): the batch is the largest allowed.
4. Learning rate: lr = `EPOCH_STEP[family]` * q, q = B / N the sample rate. Each epoch then moves the
   model by the same length (lr * steps per epoch = EPOCH_STEP) whatever the batch: the linear scaling
   rule, which keeps the noise a run accumulates per unit of progress fixed when B changes.
5. Small N, nonlinear models (`mlp`, `cnn`, `other`): the noise of an epoch, relative to its progress,
   is sigma / sqrt(N B) (T = N / B steps of noise sigma C / B each, against one epoch's movement);
   `EPOCH_STEP` was measured at N of about 855 (`NOISE_LEVEL_REF`). Where a client's level is above
   that (few examples: at N = 97 it is 8 times as high) the epoch step is scaled by
   (`NOISE_LEVEL_REF` / level) ** `NOISE_EXPONENT`: smaller steps keep tanh units out of saturation,
   from which a noisy MLP does not come back (it then predicts the majority class). Logistic
   regression is convex and has no such state: its step stays. sigma is the noise the client's plan
   calibrated (`noise_multiplier` of `resolve`), estimated from `epsilon_at` before there is a plan.
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
NOISE_LEVEL_REF = 0.015  # sigma / sqrt(N B) where EPOCH_STEP was measured (N ~ 855, epsilon 3: 0.010-0.013)
NOISE_EXPONENT = 0.5
SMALL_N_FAMILIES = ("mlp", "cnn", "other")
# (noise multiplier, sample rate, steps per round) -> epsilon of the whole run (the client's accounting)
EpsilonAt = Callable[[float, float, int], float]


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
    epsilon_at: EpsilonAt | None = None,
    noise_multiplier: float | None = None,
) -> LocalTraining:
    """The local DP-SGD settings of this client's run: the run's values, and the rules' where it set none.

    Args:
        config: the run's config (None in lr, batch_size, local_epochs or max_grad_norm: choose it).
        num_samples: this client's training examples N.
        epsilon_at: `(noise_multiplier, sample_rate, steps_per_round) -> epsilon` of the whole run (the
            client's accounting, metric releases included); needed when the batch size is chosen under a
            target epsilon, and for rule 5 under a target when `noise_multiplier` is not given.
        noise_multiplier: the noise the client's plan calibrated for the run, once it has one: rule 5
            then scales the step by the noise the client adds, not by an estimate of it.

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
        batch, chosen = _batch_size(num_samples, local_epochs, config, epsilon_at), [*chosen, "batch_size"]
    clip = config.privacy.max_grad_norm
    if clip is None:  # scaled by a tuning's trial (fedtrain/tuning.py): 1 otherwise
        clip, chosen = MAX_GRAD_NORM * config.privacy.max_grad_norm_scale, [*chosen, "max_grad_norm"]
    lr = training.lr
    if lr is None:  # rule 4 at the rule's clipping bound (or lr * C of the user's bound), then a trial's scale
        rate = 1.0 / steps_per_epoch(num_samples, batch)
        unscaled_clip = clip if "max_grad_norm" not in chosen else MAX_GRAD_NORM
        factor = _small_n_factor(fam, num_samples, batch, local_epochs, config, epsilon_at, noise_multiplier)
        step = EPOCH_STEP[fam] * factor
        lr = step * rate * MAX_GRAD_NORM / unscaled_clip * training.lr_scale
        chosen = [*chosen, "lr"]
    return LocalTraining(batch, local_epochs, lr, clip, tuple(chosen))


def _batch_size(num_samples: int, local_epochs: int, config: Config, epsilon_at: EpsilonAt | None) -> int:
    """Rule 3: the smallest batch (most steps per epoch) whose calibrated noise is at least SIGMA_TARGET."""
    most_steps = max(1, num_samples // MIN_BATCH)  # steps per epoch with the smallest batch
    fewest_steps = max(1, math.ceil(1 / MAX_SAMPLE_RATE))
    target = config.privacy.target_epsilon
    if most_steps <= fewest_steps:
        return max(1, math.ceil(num_samples / fewest_steps))
    if target is None or epsilon_at is None:  # a fixed noise: the largest batch
        return math.ceil(num_samples / fewest_steps)

    def reaches(steps: int) -> bool:
        """Does the target need SIGMA_TARGET or more at this many steps per epoch? (Fewer steps, larger
        batches: more epsilon at the same noise, so this holds up to some number of steps, then fails.)"""
        assert epsilon_at is not None and target is not None  # checked above
        return epsilon_at(SIGMA_TARGET, 1.0 / steps, steps * local_epochs) >= target

    if reaches(most_steps):
        return math.ceil(num_samples / most_steps)
    low, high = fewest_steps, most_steps  # find the most steps that still reach the target
    if not reaches(low):
        return math.ceil(num_samples / low)
    while high - low > 1:
        middle = (low + high) // 2
        if reaches(middle):
            low = middle
        else:
            high = middle
    return math.ceil(num_samples / low)


def noise_level(noise_multiplier: float, num_samples: int, batch_size: int) -> float:
    """sigma / sqrt(N B): an epoch's noise relative to its progress (rule 5)."""
    return noise_multiplier / math.sqrt(num_samples * batch_size)


def _small_n_factor(
    fam: str,
    num_samples: int,
    batch: int,
    local_epochs: int,
    config: Config,
    epsilon_at: EpsilonAt | None,
    planned_noise: float | None,
) -> float:
    """Rule 5: (NOISE_LEVEL_REF / level) ** NOISE_EXPONENT where the level is above the reference, else 1."""
    if fam not in SMALL_N_FAMILIES:
        return 1.0
    steps = steps_per_epoch(num_samples, batch)
    sigma = planned_noise if planned_noise is not None else config.privacy.noise_multiplier
    target = config.privacy.target_epsilon
    if sigma is None:
        if target is None or epsilon_at is None:
            return 1.0
        sigma = _noise_at(lambda noise: epsilon_at(noise, 1.0 / steps, steps * local_epochs), target)
    level = noise_level(sigma, num_samples, batch)
    return min(1.0, NOISE_LEVEL_REF / level) ** NOISE_EXPONENT if level > 0 else 1.0


def _noise_at(spend: Callable[[float], float], target: float) -> float:
    """The noise multiplier at which `spend` (falling with it) reaches `target`, to 1% (a bisection on
    log sigma between 0.3 and 100: the rule needs its size, not the calibration's precision)."""
    low, high = math.log(0.3), math.log(100.0)
    if spend(math.exp(high)) > target:
        return math.exp(high)
    if spend(math.exp(low)) <= target:
        return math.exp(low)
    while high - low > 0.01:
        middle = (low + high) / 2
        if spend(math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    return math.exp(high)
