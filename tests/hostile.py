"""A hostile server, in process: it drives fedtrain's real ClientApp (policy, ledger, handlers) the
way a malicious server can, with any run config, any global weights and as many messages as it
likes, and reads every reply. Clients are real: a kit from `fedtrain provision` (policy.toml,
ledger key and anchor), a shard on disk, their lifetime ledger sealed under $FEDTRAIN_HOME.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtrain import protocol
from fedtrain.clients.app import build_client_app
from fedtrain.config import Config
from fedtrain.models import build_model
from fedtrain.security.kits import provision
from tests.inprocess import LocalGrid, flower_task, over_the_wire

DIGITS_LABELS = [str(i) for i in range(10)]


def digits_shards(folder: Path, parts: int, size: int = 300) -> list[Path]:
    """`parts` disjoint shards of scikit-learn's digits, as .npz files (uint8 8x8 images, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(parts):
        part = slice(i * size, (i + 1) * size)
        path = folder / f"shard{i + 1}.npz"
        np.savez(path, x=(digits.images[part] * 16).astype(np.uint8), y=digits.target[part])
        paths.append(path)
    return paths


def run_config(**settings) -> Config:
    """What a server declares for digits shards, with `settings` on top (validated as a server would)."""
    base = {"input_shape": [1, 8, 8], "labels": DIGITS_LABELS, "rounds": 5}
    return Config(**{**base, **settings}).validate()


class Client:
    """One real client (kit + shard) behind fedtrain's deployment ClientApp (without payload sealing)."""

    def __init__(self, kit: Path, data: Path, node_id: int = 1, policy: Path | None = None) -> None:
        self.kit, self.data, self.node_id = kit, data, node_id
        self.node_config = {"kit": str(kit), "data-path": str(data), "client-name": kit.name}
        if policy is not None:
            self.node_config["policy"] = str(policy)
        self.app = build_client_app()  # config from each message's run config, policy and ledger from the kit

    def send(self, kind: str, config: Config, weights: dict[str, torch.Tensor], run: str = "run-1") -> Message:
        """One message as the server would send it; the reply as the server would receive it."""
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in weights.items())),
                protocol.CONFIG: ConfigRecord({protocol.RUN_ID: run}),
            }
        )
        with flower_task():
            msg = Message(over_the_wire(content), dst_node_id=self.node_id, message_type=kind)
            msg.metadata.__dict__["_message_id"] = msg.object_id
            context = Context(1, self.node_id, dict(self.node_config), RecordDict(), config.to_run_config())
            reply = self.app(msg, context)
        reply.content = over_the_wire(reply.content)
        return reply


def provision_clients(tmp_path: Path, count: int, size: int = 300) -> list[Client]:
    kits = provision(tmp_path / "kits", ["127.0.0.1"], count)[1:]
    shards = digits_shards(tmp_path, count, size)
    return [Client(kit, shard, i + 1) for i, (kit, shard) in enumerate(zip(kits, shards, strict=True))]


def initial_weights(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    return build_model(
        config.training.model,
        config.data.input_shape,
        len(config.data.labels),
        hidden=config.training.hidden,
        seed=seed,
    ).state_dict()


def constant_prediction(config: Config, label: int, margin: float = 50.0) -> dict[str, torch.Tensor]:
    """Crafted global weights for the logistic model: every input gets class `label`, by a margin."""
    weights = {k: torch.zeros_like(v) for k, v in initial_weights(config).items()}
    bias = next(k for k in weights if k.endswith("bias"))
    weights[bias][label] = margin
    return weights


def replies(client: Client, kind: str, config: Config, weights, count: int, run: str = "run-1") -> Iterator[Message]:
    for _ in range(count):
        yield client.send(kind, config, weights, run)


class KitGrid(LocalGrid):
    """Flower's Grid interface over real kit clients, for fedtrain's own server loop; every reply the
    server receives is kept in `seen` (copies, as over the wire)."""

    def __init__(self, clients: list[Client], config: Config) -> None:
        self.clients = {c.node_id: c for c in clients}
        self.config = config
        self.seen: list[tuple[str, RecordDict]] = []  # (message type, reply content) in arrival order

    def get_node_ids(self) -> list[int]:
        return list(self.clients)

    def answer(self, msg: Message) -> Message | None:
        client = self.clients[msg.metadata.dst_node_id]
        msg.content = over_the_wire(msg.content)
        context = Context(1, client.node_id, dict(client.node_config), RecordDict(), self.config.to_run_config())
        reply = client.app(msg, context)
        reply.content = over_the_wire(reply.content)
        self.seen.append((msg.metadata.message_type, over_the_wire(reply.content)))
        return reply
