"""The client's cumulative privacy ledger.

One entry (noise_multiplier, sample_rate, steps) per round the client trained, kept for the
whole run in the node's persistent state. Epsilon is always computed over *all* entries with
an Opacus accountant (PRV by default, RDP on request), so a round can never forget the rounds
before it. PRV (Gopi et al. 2021) gives a numerically tight upper bound, RDP a looser closed form;
both are Opacus's own implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtrain.config import ACCOUNTANTS
from fedtrain.errors import FedtrainError

if TYPE_CHECKING:  # the accounting needs no Flower (benchmarks/cuda_federated_smoke.py runs without it)
    from flwr.app import ConfigRecord

DEFAULT_DELTA = 1e-5


def make_accountant(name: str) -> IAccountant:
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise FedtrainError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}.")


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD: `steps` noisy steps at (noise_multiplier, sample_rate)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass
class PrivacyLedger:
    """All rounds a client trained, the delta its epsilon is reported at, and the accountant."""

    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    accountant: str = "prv"

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self.entries)

    def history(self) -> list[tuple[float, float, int]]:
        """The entries in the (sigma, q, steps) form Opacus accountants use."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, extra: LedgerEntry | None = None) -> float:
        """Epsilon spent so far at `delta` (plus one planned round if `extra` is given)."""
        entries = self.entries + ([extra] if extra else [])
        if not any(e.steps for e in entries):
            return 0.0
        # Composition is commutative: rounds with the same (sigma, q) are one mechanism with their
        # steps summed. Same epsilon, and PRV's cost stays flat however many rounds there are.
        steps: dict[tuple[float, float], int] = {}
        for e in entries:
            steps[(e.noise_multiplier, e.sample_rate)] = steps.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
        accountant = make_accountant(self.accountant)
        accountant.history = [(sigma, q, n) for (sigma, q), n in steps.items() if n]
        return float(accountant.get_epsilon(delta=self.delta))

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    # ---- persistence in Flower's context.state / replies ----

    def to_config_record(self) -> ConfigRecord:
        from flwr.app import ConfigRecord

        return ConfigRecord(
            {
                "accountant": self.accountant,
                "delta": self.delta,
                "noise-multiplier": [e.noise_multiplier for e in self.entries],
                "sample-rate": [e.sample_rate for e in self.entries],
                "steps": [e.steps for e in self.entries],
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> PrivacyLedger:
        try:
            sigmas = list(record.get("noise-multiplier", []))
            rates = list(record.get("sample-rate", []))
            steps = list(record.get("steps", []))
            if not (len(sigmas) == len(rates) == len(steps)):
                raise ValueError("columns of different lengths")
            entries = [LedgerEntry(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps, strict=True)]
            accountant = str(record.get("accountant", "rdp"))
            make_accountant(accountant)
            return cls(delta=float(record["delta"]), entries=entries, accountant=accountant)
        except (KeyError, TypeError, ValueError) as exc:
            raise FedtrainError(f"the stored privacy ledger is damaged ({exc}); it cannot be trusted.") from None


def client_delta(num_samples: int, configured: float | None) -> float:
    """The configured delta, or 1e-5 lowered to 1/(10 N) for small datasets."""
    if configured is not None:
        return configured
    return min(DEFAULT_DELTA, 1.0 / (10 * num_samples))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "prv"
) -> float:
    """Noise multiplier that spends at most `target_epsilon` over the *whole* planned training."""
    if total_steps < 1 or not 0 < sample_rate <= 1:
        raise FedtrainError("cannot calibrate noise: the planned training has no steps.")
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=total_steps,
        accountant=accountant,
        epsilon_tolerance=0.005,
    )
    if not math.isfinite(sigma):
        raise FedtrainError(f"no noise level reaches epsilon {target_epsilon}; raise target_epsilon.")
    return float(sigma)
