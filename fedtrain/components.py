"""Python objects a run uses in place of names (`fedtrain.simulate(model=factory, task=Task(), data=ds)`).

They are never part of a config (a config is what travels as Flower's run_config and what a server
can send): they reach only the apps built in this process, and a simulation's Ray workers, which
receive the ClientApp pickled. A real deployment names its model and task (`module:factory`,
`module:Name`), and each client runs only what its own policy lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedtrain.config import Config
from fedtrain.data import Dataset
from fedtrain.models import ModelSpec
from fedtrain.tasks import Task, build_task

if TYPE_CHECKING:
    import torch

    from fedtrain.privacy.ledger import LedgerEntry


class ClientProbe(Protocol):
    """An audit's instrumentation of one simulated client (fedtrain/audit): canaries added to its data,
    what it sends recorded. The client trains with its own DP-SGD, preflight and ledger all the same."""

    def train_split(self, train: Dataset) -> Dataset:
        """The training split this client trains on (its own, with the included canaries)."""

    def trainer_ready(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called once the round's private model and optimizer passed the preflight, before the first step."""

    def sent(self, start: dict[str, torch.Tensor], update: dict[str, torch.Tensor], entry: LedgerEntry) -> None:
        """What the client sends for a round: the global weights it started from, its update, its ledger entry."""


class RunProbe(Protocol):
    """An audit's instrumentation of a simulated run. Only `fedtrain audit` builds one: it is a Python
    object, never part of a config, so no command, config file or server can ask for it."""

    def client(self, name: str) -> ClientProbe | None:
        """The instrumentation of client `name`, or None for a client trained as usual."""

    def report_marks(self) -> dict[str, Any]:
        """Entries every privacy.json and run.json of the run carries from its first round (what it is)."""


@dataclass(frozen=True)
class Components:
    model: ModelSpec | None = None  # a factory of torch.nn.Module
    task: Task | None = None
    dataset: Dataset | None = None  # the whole dataset a simulation splits into shards
    probe: RunProbe | None = None  # `fedtrain audit` only (fedtrain/audit): canaries in one client's data


def task_for(config: Config, components: Components | None = None) -> Task:
    """The run's task: the object given, else the one its config names."""
    if components is not None and components.task is not None:
        return components.task
    return build_task(config.training.task, config.data.target_range)


def model_for(config: Config, components: Components | None = None) -> ModelSpec:
    """The run's model: the factory given, else the name its config gives."""
    if components is not None and components.model is not None:
        return components.model
    return config.training.model


def outputs_for(config: Config, task: Task) -> int:
    """Outputs per sample the model needs (classes, labels or regression targets)."""
    classes = config.data.num_classes or (len(config.data.labels) if config.data.labels else None)
    return task.output_size(classes, config.data.num_outputs)
