"""Canaries in one simulated client's data, and the record of what that client sends.

m canaries, each included in the client's training split with probability 1/2 (independent bits from
the operating system's CSPRNG, drawn before training). Two kinds:

- input canaries: out-of-distribution examples (uniform noise over the range of the client's own
  features) with random targets. They are ordinary records of the split; the final model's loss on
  each is its score (black-box: what anyone holding the model can compute).
- gradient canaries (Dirac canaries, as in the paper): canary i's per-sample gradient is C times the
  unit vector of one trainable value c_i (distinct for each canary). A gradient canary is a record of
  the split like any other: Poisson sampling picks it, clipping and noise treat it as one example; only
  its per-sample gradient row is set, after Opacus computed the rows and before it clips them. Its
  score is how far the client's updates moved value c_i beyond what the data alone moves it
  (white-box: what the server sees, audit/scores.py).

The client trains with its own DP-SGD, preflight and ledger: what is added here is this bookkeeping,
and in a positive control the noise taken out after the preflight (the ledger still records it, as an
accounting bug would). What the client sends each round is recorded sealed under a key only this
audit holds (the weights never touch the disk in plain), in a folder the audit removes.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedtrain.data import Dataset
from fedtrain.data.datasets import Item
from fedtrain.errors import FedtrainError
from fedtrain.privacy.ledger import LedgerEntry
from fedtrain.security.files import file_context, read_encrypted, write_encrypted
from fedtrain.security.keys import generate_key
from fedtrain.tensors import bytes_to_state_dict, state_dict_to_bytes

Kind = Literal["gradient", "input"]
KINDS: tuple[str, ...] = ("gradient", "input")
CANARY_CLIENT = "client-0"  # the simulated client whose data holds the canaries
START, UPDATE = "start/", "update/"


@dataclass(frozen=True)
class CanarySet:
    """The canaries of one audit and the instrumentation of the run (a RunProbe, fedtrain/components.py).

    Args:
        kind: "gradient" or "input".
        included: one bit per canary, drawn before training.
        targets: a valid target per canary (input canaries' labels; gradient canaries' are never used).
        inputs: input canaries' features; None for gradient canaries (their rows are replaced).
        coordinates: gradient canaries' trainable value (flat index over the trainable parameters).
        clip: the clipping bound C (a gradient canary's norm).
        positive_control: train the canary client without noise while its ledger records the noise.
        record_dir: where the canary client's rounds are recorded, sealed under `record_key`.
    """

    kind: Kind
    included: np.ndarray
    targets: np.ndarray
    inputs: np.ndarray | None
    coordinates: np.ndarray | None
    clip: float
    positive_control: bool
    record_dir: str
    record_key: bytes = field(repr=False)
    audit_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client_name: str = CANARY_CLIENT

    @property
    def m(self) -> int:
        return len(self.included)

    def client(self, name: str) -> CanaryClient | None:
        return CanaryClient(self) if name == self.client_name else None

    def report_marks(self) -> dict[str, Any]:
        marks: dict[str, Any] = {
            "audit_run": f"{self.client_name}'s training split held {self.m} {self.kind} canaries, each included with "
            'probability 1/2 (fedtrain audit); the "audit" section, written when the audit ends, gives the lower bound '
            "they show"
        }
        if self.positive_control:
            marks["positive_control"] = (
                f"POSITIVE CONTROL: {self.client_name} trained WITHOUT DP-SGD noise on purpose (fedtrain audit "
                "--positive-control), while its ledger records the configured noise: the epsilon reported for it "
                "is false, and this run's model is not private"
            )
        return marks

    def records(self) -> list[Round]:
        """Every round the canary client recorded (any order: the scores sum over rounds)."""
        rounds = []
        for path in sorted(Path(self.record_dir).glob("round-*.ftenc")):
            plain = read_encrypted(path, self.record_key, file_context("audit-round", self.audit_id))
            state, meta = bytes_to_state_dict(plain, what=f"the audit record {path}")
            start = {k[len(START) :]: v for k, v in state.items() if k.startswith(START)}
            update = {k[len(UPDATE) :]: v for k, v in state.items() if k.startswith(UPDATE)}
            entry = LedgerEntry(float(meta["noise_multiplier"]), float(meta["sample_rate"]), int(meta["steps"]))
            rounds.append(Round(start, update, entry))
        return rounds


@dataclass(frozen=True)
class Round:
    """One round the canary client sent: the global weights it started from, its update, its ledger entry."""

    start: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    entry: LedgerEntry


class CanaryData(Dataset):
    """A training split with the included canaries after its own records. Every batch read from it tells
    which of its rows are canaries (`take_fetched`): Opacus's loader reads one batch at a time, in this
    process, right before the step that uses it."""

    def __init__(self, base: Dataset, canaries: CanarySet) -> None:
        self.base, self.canaries = base, canaries
        self.ids = np.flatnonzero(canaries.included)
        self.class_names = base.class_names
        self._fetched: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.base) + len(self.ids)

    def _canary(self, canary: int) -> Item:
        inputs = self.canaries.inputs
        x = inputs[canary] if inputs is not None else np.zeros(self.base.input_shape, dtype=np.float32)
        return x, self.canaries.targets[canary]

    def __getitem__(self, index: int) -> Item:
        index = int(index)
        return self.base[index] if index < len(self.base) else self._canary(int(self.ids[index - len(self.base)]))

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        own = len(self.base)
        self._fetched = [(row, int(self.ids[int(i) - own])) for row, i in enumerate(indices) if int(i) >= own]
        return [self[int(i)] for i in indices]

    def targets(self) -> np.ndarray:
        return np.concatenate([self.base.targets(), self.canaries.targets[self.ids]])

    def take_fetched(self) -> list[tuple[int, int]]:
        """(row in the batch, canary) of the last batch read; cleared, so no batch is seen twice."""
        fetched, self._fetched = self._fetched, []
        return fetched


class CanaryClient:
    """The canary client's instrumentation (a ClientProbe, fedtrain/components.py)."""

    def __init__(self, canaries: CanarySet) -> None:
        self.canaries = canaries
        self.data: CanaryData | None = None

    def train_split(self, train: Dataset) -> Dataset:
        self.data = CanaryData(train, self.canaries)
        return self.data

    def trainer_ready(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.canaries.positive_control:
            optimizer.noise_multiplier = 0.0  # type: ignore[attr-defined]  # after the preflight, silently
        if self.canaries.kind == "gradient":
            if self.data is None:
                raise FedtrainError("the canary client trained on a split without its canaries.")
            _set_canary_gradients(optimizer, self.data, self.canaries)

    def sent(self, start: dict[str, torch.Tensor], update: dict[str, torch.Tensor], entry: LedgerEntry) -> None:
        state = {**{START + k: v for k, v in start.items()}, **{UPDATE + k: v for k, v in update.items()}}
        meta = {"noise_multiplier": entry.noise_multiplier, "sample_rate": entry.sample_rate, "steps": entry.steps}
        path = Path(self.canaries.record_dir) / f"round-{uuid.uuid4().hex}.ftenc"
        context = file_context("audit-round", self.canaries.audit_id)
        write_encrypted(path, state_dict_to_bytes(state, meta), self.canaries.record_key, context)


def _set_canary_gradients(optimizer: torch.optim.Optimizer, data: CanaryData, canaries: CanarySet) -> None:
    """Before Opacus clips each step's per-sample gradients, a gradient canary's row becomes C e_{c_i}."""
    params = list(optimizer.params)  # type: ignore[attr-defined]  # Opacus's DPOptimizer: the trainable ones
    offsets = np.cumsum([0] + [p.numel() for p in params])
    assert canaries.coordinates is not None
    original = optimizer.clip_and_accumulate  # type: ignore[attr-defined]

    def clip_and_accumulate() -> None:
        for row, canary in data.take_fetched():
            coordinate = int(canaries.coordinates[canary])  # type: ignore[index]
            for p in params:
                p.grad_sample[row].zero_()
            which = int(np.searchsorted(offsets, coordinate, side="right")) - 1
            target = params[which]
            within = np.unravel_index(coordinate - int(offsets[which]), tuple(target.shape))
            target.grad_sample[(row, *within)] = canaries.clip
        original()

    optimizer.clip_and_accumulate = clip_and_accumulate  # type: ignore[attr-defined]


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters, in the order the canaries' coordinates count their values."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def make_canaries(
    kind: Kind,
    m: int,
    train: Dataset,
    model: torch.nn.Module,
    clip: float,
    positive_control: bool,
    record_dir: Path,
    classes: int | None,
) -> CanarySet:
    """Draw m canaries of `kind` for the client whose real training split is `train`.

    Args:
        kind: "gradient" or "input".
        m: canaries (at least 2; gradient canaries at most the model's trainable values).
        train: the canary client's own training split (input canaries span its features' range).
        model: the run's model (its trainable values are the gradient canaries' coordinates).
        clip: the clipping bound C.
        positive_control: the audit's control: no noise for the canary client.
        record_dir: an empty private folder for the client's sealed round records.
        classes: the number of classes of a classification task, else None (targets are then real ones).

    Returns:
        The CanarySet.

    Raises:
        FedtrainError: an unknown kind, or m out of range.
    """
    if kind not in KINDS:
        raise FedtrainError(f"the canary kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if m < 2 or (kind == "gradient" and m > values):
        most = f"at most the model's {values} trainable values" if kind == "gradient" else "any number"
        raise FedtrainError(f"an audit needs at least 2 canaries and {most}, not {m}; choose --canaries.")
    rng = np.random.default_rng(secrets.randbits(128))  # the inclusion bits must be unpredictable
    included = rng.random(m) < 0.5
    real_targets = train.targets()
    if classes is not None and kind == "input":
        targets = rng.integers(0, classes, size=m).astype(real_targets.dtype)
    else:
        targets = real_targets[rng.integers(0, len(real_targets), size=m)]
    inputs = coordinates = None
    if kind == "input":
        sample, _ = train.batch(rng.choice(len(train), size=min(len(train), 1000), replace=False))
        low, high = sample.min(axis=0), sample.max(axis=0)
        inputs = (low + (high - low) * rng.random((m, *sample.shape[1:]))).astype(np.float32)
    else:
        coordinates = rng.choice(values, size=m, replace=False)
    key = generate_key()  # for this audit's records only, never on disk
    return CanarySet(kind, included, targets, inputs, coordinates, clip, positive_control, str(record_dir), key)


__all__ = ["CANARY_CLIENT", "KINDS", "CanaryData", "CanarySet", "Round", "make_canaries", "trainable_names"]
