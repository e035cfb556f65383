"""A privacy ledger: every mechanism that ran on a client's private data, in order.

One entry per mechanism run: a DP-SGD round (`kind` "train": `steps` noisy steps at sample rate q)
or a metric release (`kind` "metrics": the Gaussian mechanism, q = 1, one step). Epsilon is always
computed over *all* entries with an Opacus accountant, so nothing spent is ever forgotten. The
ledger holds only public parameters (noise multipliers, sample rates, step counts): it may be sent
to the server and written to privacy.json, and anyone can recompute its epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtrain.errors import FedtrainError
from fedtrain.privacy.accountants import epsilon, make_accountant

KINDS = ("train", "metrics")


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism run: `steps` Gaussian steps at (noise_multiplier, sample_rate)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = "train"

    @classmethod
    def release(cls, noise_multiplier: float) -> LedgerEntry:
        """A metric release: the Gaussian mechanism is a subsampled Gaussian with q = 1 and one step."""
        return cls(noise_multiplier, 1.0, 1, "metrics")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LedgerEntry:
        """Parse and check one entry; raises ValueError/TypeError/KeyError when it is malformed."""
        entry = cls(
            float(data["noise_multiplier"]),
            float(data["sample_rate"]),
            int(data["steps"]),
            str(data.get("kind", "train")),
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

    def history(self) -> list[tuple[float, float, int]]:
        """The entries in the (sigma, q, steps) form Opacus accountants use."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, *extra: LedgerEntry) -> float:
        """Epsilon spent at `delta` so far (plus planned `extra` entries, for a budget check)."""
        return epsilon(
            [*self.history(), *((e.noise_multiplier, e.sample_rate, e.steps) for e in extra)],
            self.delta,
            self.accountant,
        )

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
