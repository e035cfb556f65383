"""Partial training (issue 16, acceptance 3): only parameters with requires_grad are trained, noised
and sent; the server aggregates only those, and the encrypted model on disk holds the whole model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedtrain import protocol
from fedtrain.components import Components
from fedtrain.config import Config
from fedtrain.security.keys import generate_key, read_key_file, write_key_file
from fedtrain.server.loop import Federation
from fedtrain.server.model_files import MODEL_FILE, load_model, read_run_info
from fedtrain.simulation import prepare
from tests.inprocess import AppGrid, flower_task

HEAD = {"1.weight", "1.bias"}


def frozen_backbone(input_shape, num_classes):
    """A 'pretrained' backbone (seeded, so server and clients build the same weights), frozen; a head trained."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh())
    backbone.requires_grad_(False)
    return nn.Sequential(backbone, nn.Linear(32, num_classes))


def test_a_frozen_backbone_sends_only_its_trainable_parameters(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "model.key", generate_key())
    components = Components(model=frozen_backbone)
    config = Config(clients=3, rounds=2, model="python:frozen_backbone", run_dir=str(tmp_path / "run"),
                    key_file=str(key), fraction_evaluate=0.0)  # fmt: skip
    config, test_set = prepare(config, components)
    sent: list[dict[str, torch.Size]] = []

    class Spy(AppGrid):
        def deliver(self, node, msg):
            reply = super().deliver(node, msg)
            if reply is not None and not reply.has_error():
                arrays = reply.content.array_records.get(protocol.ARRAYS)
                if arrays is not None:
                    sent.append({k: torch.Size(a.shape) for k, a in arrays.items()})
            return reply

    torch.manual_seed(config.federation.seed)  # as the server and every client seed it
    initial = frozen_backbone([1, 8, 8], 10).state_dict()
    with flower_task():
        rows = Federation(config, test_set=test_set, on_round=lambda row: None, components=components).run(
            Spy(config, components=components)
        )
    assert [row["clients_ok"] for row in rows] == [3, 3]
    assert len(sent) == 6 and all(set(update) == HEAD for update in sent)
    assert all(update["1.weight"] == torch.Size([10, 32]) and update["1.bias"] == torch.Size([10]) for update in sent)

    run = Path(config.deployment.run_dir)
    state, _ = load_model(run / MODEL_FILE, read_key_file(key), read_run_info(run)["run_id"], "model")
    assert set(state) == {"0.1.weight", "0.1.bias", *HEAD}  # the whole model, encrypted
    assert torch.equal(state["0.1.weight"], initial["0.1.weight"])  # the backbone as it was made
    assert not torch.equal(state["1.weight"], initial["1.weight"])  # the head trained
