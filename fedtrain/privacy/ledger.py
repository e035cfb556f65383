"""A privacy ledger: every mechanism that ran on a client's private data, in order.

One entry per mechanism run: a DP-SGD round (`kind` "train": `steps` noisy steps at sample rate q),
a metric release (`kind` "metrics": the Gaussian mechanism, q = 1, one step), or a whole private
hyperparameter tuning (`kind` "tuning": the best of K ~ D(eta, gamma) trials of `steps` steps each;
privacy/tuning.py). Epsilon is always
computed over *all* entries with an Opacus accountant, so nothing spent is ever forgotten. The
ledger holds only public parameters (noise multipliers, sample rates, step counts): it may be sent
to the server and written to privacy.json, and anyone can recompute its epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtrain.errors import FedtrainError
from fedtrain.privacy.accountants import Mechanism, Tuning, epsilon, make_accountant
from fedtrain.privacy.tuning import TrialCount

KINDS = ("train", "metrics", "tuning")


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism run: `steps` Gaussian steps at (noise_multiplier, sample_rate); for a tuning,
    each trial's steps, and the trial count's distribution (eta, gamma)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = "train"
    eta: float | None = None
    gamma: float | None = None

    @classmethod
    def tuning(cls, noise_multiplier: float, sample_rate: float, steps: int, trials: TrialCount) -> LedgerEntry:
        """A whole tuning: the best of K ~ `trials` runs of `steps` steps at (noise_multiplier, sample_rate)."""
        return cls(noise_multiplier, sample_rate, steps, "tuning", trials.eta, trials.gamma)

    @classmethod
    def release(cls, noise_multiplier: float) -> LedgerEntry:
        """A metric release: the Gaussian mechanism is a subsampled Gaussian with q = 1 and one step."""
        return cls(noise_multiplier, 1.0, 1, "metrics")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }
        if self.kind == "tuning":
            data.update(eta=self.eta, gamma=self.gamma)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """Parse and check one entry; raises ValueError/TypeError/KeyError when it is malformed."""
        kind = str(data.get("kind", "train"))
        trials = TrialCount(float(data["eta"]), float(data["gamma"])) if kind == "tuning" else None
        entry = cls(
            float(data["noise_multiplier"]),
            float(data["sample_rate"]),
            int(data["steps"]),
            kind,
            trials.eta if trials else None,
            trials.gamma if trials else None,
        )
        if entry.kind not in KINDS or not entry.noise_multiplier > 0 or not 0 < entry.sample_rate <= 1:
            raise ValueError(f"entry {data} is out of range")
        if entry.steps < 0:
            raise ValueError(f"entry {data} has negative steps")
        return entry


@dataclass
class PrivacyLedger:
    """The entries, the delta epsilon is reported at, and the accountant that computes it."""

    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    accountant: str = "prv"

    @property
    def total_steps(self) -> int:
        """DP-SGD steps (metric releases are not steps of training)."""
        return sum(e.steps for e in self.entries if e.kind == "train")

    def history(self) -> list[Mechanism]:
        """The mechanism entries in the (sigma, q, steps) form Opacus accountants use (tunings aside)."""
        return _mechanisms(self.entries)

    def epsilon(self, *extra: LedgerEntry) -> float:
        """Epsilon spent at `delta` so far (plus planned `extra` entries, for a budget check)."""
        every = [*self.entries, *extra]
        return epsilon(_mechanisms(every), self.delta, self.accountant, _tunings(every))

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "delta": self.delta, "entries": [e.to_dict() for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Parse a ledger written by `to_dict`.

        Raises:
            FedtrainError: when it is malformed (a damaged ledger is never trusted).
        """
        try:
            accountant = str(data.get("accountant", "prv"))
            make_accountant(accountant)
            delta = float(data["delta"])
            if not 0 < delta < 1:
                raise ValueError(f"delta {delta} is out of range")
            entries = [LedgerEntry.from_dict(e) for e in data.get("entries", [])]
        except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError, FedtrainError) as exc:
            raise FedtrainError(f"a privacy ledger is damaged ({exc}); it cannot be trusted.") from None
        return cls(delta=delta, entries=entries, accountant=accountant)


def _mechanisms(entries: list[LedgerEntry]) -> list[Mechanism]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.kind != "tuning"]


def _tunings(entries: list[LedgerEntry]) -> list[Tuning]:
    return [
        (e.noise_multiplier, e.sample_rate, e.steps, float(e.eta), float(e.gamma))  # type: ignore[arg-type]
        for e in entries
        if e.kind == "tuning"
    ]
